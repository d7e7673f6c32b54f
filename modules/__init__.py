"""The toolkit's code, in layers; a layer imports only the layers below it (tests/test_layers.py).

    errors.py, durable.py   the user errors; the one module that writes durably (standard library, xxhash)
    core/                   pure ML: networks, objectives, samplers, EMA and metric arithmetic
    config/                 run configs, presets, the command line
    data/                   files to tensors: sources, decoding, captions, the latent store, read order
    run/                    the harness: output folder, accelerator, checkpoints, exports, tracking
    interop/                other people's weights: diffusers/SD/LDM VAEs, DiT, CLIP, LPIPS
    eval/                   features, scores, sweeps, plots
"""
