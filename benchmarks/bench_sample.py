"""Generation speed: noise to decoded images, ours against diffusers' UNet (or DiT) + VAE of the same widths.

    python benchmarks/bench_sample.py --device cuda --batch 1,64 --steps 1,4,128 [--compile]
    python benchmarks/bench_sample.py --unet-preset tiny --vae-preset tiny --device cpu --batch 1,2 --steps 1,2

Per (batch, steps): the median wall time of one whole generation, from noise through ``steps``
network evaluations (Euler / shortcut steps, one conditional forward each: guidance scale 1)
to the decoded images, with bf16 weights and compute on CUDA (float32 on CPU). Ours is
``modules.generation`` (what sample.py runs); diffusers' is ``UNet2DConditionModel`` (the
preset's widths, as ``bench_unet.py`` builds it; ``DiTTransformer2DModel`` for a DiT preset) and
``AutoencoderKL`` (``bench_vae.py``'s), stepped by the same Euler loop. ``--compile`` compiles
both networks and both decoders with ``mode="reduce-overhead"`` (CUDA graphs on GPU). Prints a markdown table with ours/diffusers
ratios; ``--json OUT`` also writes the numbers. Random weights: this measures speed, not images.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_unet  # noqa: E402
import bench_vae  # noqa: E402
from modules.config import ConfigError, UNetRunConfig, VAERunConfig  # noqa: E402
from modules.config_io import load_config  # noqa: E402
from modules.generation import GenerationSpec, decode_latents, generate_latents  # noqa: E402
from modules.networks import build_network  # noqa: E402
from modules.vae import AutoencoderKL  # noqa: E402

NUM_CLASSES = bench_unet.NUM_CLASSES


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unet-preset", default="sd15", help="a configs/unet preset or JSON file")
    p.add_argument("--vae-preset", default="kl-f8", help="a configs/vae preset or JSON file")
    p.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--steps", default="1,4,128", help="comma-separated step counts (powers of two)")
    p.add_argument("--repeats", type=int, default=5, help="timed generations per (batch, steps)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help='torch.compile(mode="reduce-overhead") every network')
    p.add_argument("--no-diffusers", action="store_true", help="measure only ours")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.batch = [int(v) for v in args.batch.split(",")]
    args.steps = [int(v) for v in args.steps.split(",")]
    try:
        vae_cfg = load_config(VAERunConfig, "vae", args.vae_preset).model
        args.cfg = load_config(UNetRunConfig, "unet", args.unet_preset,
                               ["cond.type=class", f"cond.num_classes={NUM_CLASSES}",
                                f"model.in_channels={vae_cfg.latent_channels}",
                                f"cond.image_downsample={vae_cfg.downsample_factor}",
                                f"shortcut.denoise_timesteps={max(args.steps)}", f"sample.steps={args.steps[0]}"])
        args.cfg.model.num_step_levels = args.cfg.num_step_levels
    except ConfigError as e:
        p.error(str(e))
    args.vae_cfg = vae_cfg
    args.latent_size = args.cfg.latent_size
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()                                   # warm-up (and compilation)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def ours(args, device, dtype) -> Callable[[int, int], torch.Tensor]:
    unet = build_network(args.cfg.model, args.cfg.cond).to(device, dtype).eval()
    vae = AutoencoderKL(args.vae_cfg).to(device, dtype).eval()
    if args.compile:
        unet = torch.compile(unet, mode="reduce-overhead")
        vae.decode = torch.compile(vae.decode, mode="reduce-overhead")
    spec = GenerationSpec.from_run_config(args.cfg)

    def generate(batch: int, steps: int) -> torch.Tensor:
        labels = (torch.arange(batch) % NUM_CLASSES).to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            z = generate_latents(unet, spec, labels, range(batch), steps, device=device)
            return decode_latents(vae, z, 1.0, batch)
    return generate


def diffusers(args, device, dtype) -> Callable[[int, int], torch.Tensor]:
    bench_args = argparse.Namespace(cfg=args.cfg, latent_size=args.latent_size)
    unet = bench_unet.build_diffusers(bench_args).to(device, dtype).eval()
    vae = bench_vae.build_diffusers(args.vae_cfg).to(device, dtype).eval()
    if args.compile:
        unet = torch.compile(unet, mode="reduce-overhead")
        vae.decode = torch.compile(vae.decode, mode="reduce-overhead")
    m = args.cfg.model

    def generate(batch: int, steps: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, m.in_channels, args.latent_size, args.latent_size, generator=g).to(device)
        labels = (torch.arange(batch) % NUM_CLASSES).to(device)
        context = torch.zeros(batch, bench_unet.CONTEXT_TOKENS, m.context_dim, device=device, dtype=dtype)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for i in range(steps):
                t = torch.full((batch,), 1000.0 * i / steps, device=device)
                v = bench_unet.call_diffusers(unet, x.to(dtype), t, labels, context, m.arch == "dit")
                x = x + v.float() / steps
            return vae.decode(x.to(dtype)).sample.float().clamp(-1, 1)
    return generate


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    builders = [("ours", ours)] + ([] if args.no_diffusers else [("diffusers", diffusers)])
    rows = []
    for name, build in builders:
        generate = build(args, device, dtype)
        for batch in args.batch:
            for steps in args.steps:
                ms = median_ms(lambda: generate(batch, steps), args.repeats, device)
                rows.append({"model": name, "batch": batch, "steps": steps, "ms": ms, "img_s": batch / ms * 1000})
        del generate
    lines = [f"Generation, UNet `{args.unet_preset}` + VAE `{args.vae_preset}`, latents {args.latent_size}x"
             f"{args.latent_size}, {device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
             f"{dtype}{', compiled (reduce-overhead)' if args.compile else ''}, torch {torch.__version__}", "",
             "| batch | steps | ours ms | diffusers ms | ours / diffusers |", "| --- | --- | --- | --- | --- |"]
    for batch in args.batch:
        for steps in args.steps:
            mine = next(r for r in rows if r["model"] == "ours" and r["batch"] == batch and r["steps"] == steps)
            ref = next((r for r in rows if r["model"] == "diffusers" and r["batch"] == batch
                        and r["steps"] == steps), None)
            ref_ms = f"{ref['ms']:.1f}" if ref else "n/a"
            ratio = f"{mine['ms'] / ref['ms']:.2f}" if ref else "n/a"
            lines.append(f"| {batch} | {steps} | {mine['ms']:.1f} | {ref_ms} | {ratio} |")
    print("\n".join(lines))
    report = {"unet_preset": args.unet_preset, "vae_preset": args.vae_preset, "device": str(device),
              "dtype": str(dtype), "compile": args.compile, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
