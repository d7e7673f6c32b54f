"""modules/core/networks/dit.py and modules/interop/dit.py: the DiT against diffusers' DiTTransformer2DModel and the
DiT paper's sizes, its conditioning, switches and exports; the DiT configs' and init_from's refusals."""
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import test_unet
import torch
from PIL import Image
from support import network_of, sizes_of
from test_train_unet import assert_same_weights, train
from test_unet import DOWNSAMPLE, LATENT, inputs, masks, perturbed, sizes
from torch.utils.flop_counter import FlopCounterMode

import sample
import train_unet
from modules.config.cli import run_cli
from modules.config.io import load_config, to_dict
from modules.config.schema import ConfigError, DataConfig, UNetRunConfig, network_sizes, sizes_problem
from modules.core.networks import build_network
from modules.core.networks.denoiser import CondConfig, NetworkInputs, count_parameters
from modules.core.networks.dit import DiT, DiTConfig
from modules.core.networks.unet import UNet
from modules.core.networks.vae import VAEConfig
from modules.core.seeding import image_seed, initial_noise
from modules.data.image_io import to_uint8
from modules.errors import CheckpointError, ModelFolderError
from modules.interop.dit import load_init_weights
from modules.interop.vae import load_vae
from modules.run.checkpoint import RunIdentity
from modules.run.export import load_network, save_network

TINY = DiTConfig(hidden_size=32, depth=2, num_heads=2, patch_size=2)
CLASSES = CondConfig(type="class")
NUM_CLASSES = 5      # CLASSES' class count (a size now, was cond.num_classes)
MASK = CondConfig(type="mask", mask_mode="concat", mask_channels=8)   # images DOWNSAMPLE x the latents
OLD_FIXTURE = Path(__file__).parent / "fixtures" / "f0126e0"   # written by the code before the restructuring


def tiny(cond: CondConfig = CondConfig(), num_classes: int = 0, num_step_levels: int = 0, **model_changes) -> DiT:
    torch.manual_seed(0)
    return build_network(dataclasses.replace(TINY, **model_changes), cond, sizes(cond, num_classes, num_step_levels))


# ----------------------------------------------------------------------------- against diffusers

def diffusers_dit(folder, classes=5, out_channels=None, heads=2, head_dim=16, layers=2, same_embedders=True,
                  norm_eps=1e-6, sample_size=LATENT):
    """A random diffusers DiT saved as safetensors; its blocks share one time/class embedder, as in
    converted official checkpoints (diffusers' own init gives each block another)."""
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    theirs = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                   out_channels=out_channels, num_layers=layers, sample_size=sample_size, patch_size=2,
                                   num_embeds_ada_norm=classes, norm_eps=norm_eps).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
        if same_embedders:
            for block in theirs.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(theirs.transformer_blocks[0].norm1.emb.state_dict())
    theirs.save_pretrained(folder, safe_serialization=True)
    return theirs


def converted(folder, cond: CondConfig = CLASSES, *overrides: str, num_classes: int = NUM_CLASSES,
              **other_sizes) -> DiT:
    """A DiT of ``cond`` with ``folder``'s weights; objective=flow (no step input) unless ``overrides`` set
    another; built for ``num_classes`` classes (class conditions) and the other sizes (support.sizes_of)."""
    cfg = load_config(UNetRunConfig, "unet", "dit-tiny",
                      ["objective=flow", "model.hidden_size=32", "model.num_heads=2", "model.time_freq_shift=1",
                       f"init_from={folder}", f"cond.type={cond.type}", "cond.mask_mode=concat",
                       f"cond.mask_channels={cond.mask_channels}", *overrides])
    other_sizes.setdefault("downsample", DOWNSAMPLE if cond.type == "mask" else 8)   # MASK's images: DOWNSAMPLE x
    model = network_of(cfg, num_classes=num_classes, **other_sizes)
    load_init_weights(model, cfg, model.sizes)
    return model.eval()


@pytest.mark.parametrize("out_channels", [None, 8], ids=["epsilon", "learned_sigma"])
def test_converted_diffusers_dit_computes_the_same_function(out_channels, tmp_path):
    """Same latents, labels (the null label 5 included) and times: ours takes t in [0, 1] and embeds t * 1000,
    diffusers takes the timestep t * 1000. A learned-sigma checkpoint keeps its mean channels."""
    pytest.importorskip("diffusers")
    theirs = diffusers_dit(tmp_path / "d", out_channels=out_channels)
    x, t = inputs(3)
    labels = torch.tensor([0, 4, 5])
    with torch.no_grad():
        expected = theirs(x, t * 1000, class_labels=labels).sample[:, :4]
        # A shortcut model: its zero-initialised step-size embedding leaves the function unchanged.
        # dit-tiny's shortcut.denoise_timesteps=8: a step-size table of 4 levels
        ours = converted(tmp_path / "d", CLASSES, "objective=shortcut")(x, t, level=torch.tensor([0, 2, 3]),
                                                                        cond=labels)
        other_spacing = converted(tmp_path / "d", CLASSES, "model.time_freq_shift=0")(x, t, cond=labels)
    scale = expected.abs().max()
    assert (ours - expected).abs().max() < 1e-6 * scale, (ours - expected).abs().max() / scale
    # The sinusoid spacing is what model.time_freq_shift=1 reproduces: without it the outputs differ.
    assert (other_spacing - expected).abs().max() > 0.05 * scale


@pytest.mark.parametrize("cond,text_mode", [(CondConfig(), ""), (MASK, ""), (CondConfig(type="text"), "crossattn"),
                                            (CondConfig(type="text"), "pooled")],
                         ids=["none", "mask", "text_crossattn", "text_pooled"])
def test_unconditional_mask_and_text_models_start_as_the_null_label_dit(cond, text_mode, tmp_path):
    """No label table: the null label's embedding moves into the time MLP bias; a mask model's extra
    input channels start at zero weight, a text model's cross-attention outputs and pooling at zero,
    so none changes the converted function."""
    pytest.importorskip("diffusers")
    theirs = diffusers_dit(tmp_path / "d")
    x, t = inputs(3)
    text = [f"cond.text_mode={text_mode}", "cond.text_encoder=clip"]
    text_sizes = dict(text_tokens=5, text_width=8)   # were cond.text_tokens=5, model.context_dim=8
    given = {"mask": masks(3, density=0.5), "text": torch.randn(3, 5, 8)}.get(cond.type)
    with torch.no_grad():
        expected = theirs(x, t * 1000, class_labels=torch.full((3,), 5)).sample
        ours = converted(tmp_path / "d", cond, *(text if text_mode else []),
                         **(text_sizes if text_mode else {}))(x, t, cond=given)
    assert (ours - expected).abs().max() < 1e-6 * expected.abs().max()


def test_blocks_with_differing_embedders_are_refused(tmp_path):
    pytest.importorskip("diffusers")
    diffusers_dit(tmp_path / "d", same_embedders=False)
    with pytest.raises(ModelFolderError, match=r"block 1's time/class embedder differs from block 0's "
                                               r"\('transformer_blocks\.1\.norm1\.emb\."):
        converted(tmp_path / "d")


# ----------------------------------------------------------------------------- sizes

PAPER = {"dit-s": (33e6, 6.06), "dit-b": (130e6, 23.01), "dit-l": (458e6, 80.71), "dit-xl": (675e6, 118.64)}


def closed_form_parameters(m: DiTConfig, num_classes: int, out_channels: int, in_channels: int = 4) -> int:
    d, p, c = m.hidden_size, m.patch_size, in_channels
    mlp = int(d * m.mlp_ratio)
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + (d * 6 * d + 6 * d)
    return ((c * p * p * d + d) + (256 * d + d) + (d * d + d) + (num_classes + 1) * d + m.depth * block
            + (d * 2 * d + 2 * d) + (d * p * p * out_channels + p * p * out_channels))


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_sizes_match_the_dit_paper(preset):
    """Params and Gflops of one forward at 32x32x4 latents (256 px), counted on the meta device. The
    paper's "Gflops" are multiply-accumulates (fvcore's convention); FlopCounterMode counts 2 FLOPs per
    MAC. The paper's models predict a learned sigma too (8 output channels) and hold the fixed position
    codes as a (frozen) parameter; ours do neither, so both are added in closed form."""
    cfg = load_config(UNetRunConfig, "unet", preset, ["cond.type=class"])
    m = cfg.model
    # 1000 classes, 4 latent channels and no step input (as the old flat config's defaults built it)
    paper_sizes = dataclasses.replace(sizes_of(cfg, num_classes=1000), inputs=NetworkInputs())
    with torch.device("meta"):
        model = build_network(m, cfg.cond, paper_sizes)
        x, t, labels = torch.zeros(1, 4, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, t, cond=labels)
    params = count_parameters(model)
    assert params == closed_form_parameters(m, 1000, out_channels=4)
    tokens = (32 // m.patch_size) ** 2
    sigma_params = m.hidden_size * m.patch_size ** 2 * 4 + m.patch_size ** 2 * 4
    paper_params = params + sigma_params + tokens * m.hidden_size
    gmacs = counter.get_total_flops() / 2 / 1e9
    paper_gmacs = gmacs + tokens * m.hidden_size * m.patch_size ** 2 * 4 / 1e9
    print(f"{preset}: {paper_params:,} parameters as the paper counts them, {paper_gmacs:.3f} GMACs "
          f"(paper {PAPER[preset][0] / 1e6:.0f}M, {PAPER[preset][1]})")
    assert paper_params == pytest.approx(PAPER[preset][0], rel=0.01)
    assert paper_gmacs == pytest.approx(PAPER[preset][1], rel=0.01)


# ----------------------------------------------------------------------------- the network

def test_zero_at_init_then_time_level_and_class_matter_and_drop_is_the_null_label():
    model = tiny(CLASSES, num_classes=NUM_CLASSES, num_step_levels=4).eval()
    x, t = inputs(3)
    level, labels = torch.tensor([0, 1, 3]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.count_nonzero(model(x, t, level=level, cond=labels)) == 0   # adaLN-Zero, zero final layer
        model = perturbed(model)
        out = model(x, t, level=level, cond=labels)
        assert out.shape == x.shape and torch.isfinite(out).all()
        for changed in (dict(t=t + torch.tensor([0.01, 0, 0])), dict(level=torch.tensor([1, 1, 3])),
                        dict(cond=torch.tensor([3, 1, 2]))):
            other = model(**{"x": x, "t": t, "level": level, "cond": labels, **changed})
            assert (other[0] - out[0]).abs().max() > 1e-3 and torch.allclose(other[1:], out[1:], atol=1e-6)
        null = model(x, t, level=level, cond=torch.full((3,), 5))
        assert torch.equal(model(x, t, level=level, cond=None), null)
        dropped = model(x, t, level=level, cond=labels, drop=torch.tensor([True, False, True]))
    assert torch.allclose(dropped[0::2], null[0::2], atol=1e-6) and torch.allclose(dropped[1], out[1], atol=1e-6)


@pytest.mark.parametrize("cond", [CondConfig(), CLASSES, MASK], ids=["none", "class", "mask"])
def test_every_parameter_takes_part_in_a_training_step(cond):
    """DDP without find_unused_parameters needs this: the class conditioner makes no context tokens for a
    DiT (a UNet's to_context would get no gradient)."""
    model = tiny(cond, num_classes=NUM_CLASSES, num_step_levels=4).train()
    x, t = inputs(2)
    label = {"none": None, "class": torch.tensor([0, 2]), "mask": masks(2, density=0.5)}[cond.type]
    model(x, t, level=torch.tensor([1, 3]), cond=label).square().mean().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert not any("to_context" in name for name, _ in model.named_parameters())


def test_bad_inputs_are_refused_with_a_message():
    model = tiny()
    with pytest.raises(ValueError, match=r"divisible by 2 \(model.patch_size=2\)"):
        model(torch.zeros(2, 4, 7, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="unconditional"):
        model(*inputs(2), cond=torch.tensor([0, 1]))


def test_save_load_round_trip_is_exact_and_other_latent_sizes_work(tmp_path):
    model = perturbed(tiny(MASK, num_step_levels=4))
    run = UNetRunConfig(model=TINY, cond=MASK, data=DataConfig(image_size=LATENT * DOWNSAMPLE),
                        shortcut=dataclasses.replace(UNetRunConfig().shortcut, denoise_timesteps=8),
                        sample=dataclasses.replace(UNetRunConfig().sample, steps=(1, 8)))
    folder = save_network(tmp_path / "unet", model.state_dict(), run, model.sizes, {"path": "runs/vae"},
                          weights="ema")
    loaded = load_network(folder)
    assert isinstance(loaded, DiT)
    x, t = inputs(2)
    args = dict(level=torch.tensor([1, 2]), cond=masks(2, density=0.5), drop=torch.tensor([False, True]))
    with torch.no_grad():
        assert torch.equal(model(x, t, **args), loaded(x, t, **args))
        wide = torch.zeros(1, 4, LATENT, 2 * LATENT)
        wide_mask = torch.zeros(1, 1, LATENT * DOWNSAMPLE, 2 * LATENT * DOWNSAMPLE)
        assert loaded(wide, t[:1], level=args["level"][:1], cond=wide_mask).shape == wide.shape


@pytest.mark.parametrize("guard", ["test_gradient_checkpointing_and_channels_last_give_the_same_result",
                                   "test_compiles_without_graph_breaks",
                                   "test_compiled_training_step_matches_eager_and_compiles_once"])
def test_the_unets_switch_guards_hold_for_the_dit(guard, monkeypatch):
    """train.gradient_checkpointing, channels_last and compile: the UNet's guard tests (same gradients; no
    graph break; a compiled shortcut step equals eager and later steps reuse the graph), run on DiTs
    (mask conditioning by concatenated channels, the DiT's only mask mode)."""
    monkeypatch.setattr(test_unet, "tiny", tiny)
    monkeypatch.setattr(test_unet, "mask_cond", lambda mode: MASK)
    getattr(test_unet, guard)()


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("override, message", [
    ("model.patch_size=3", "config key 'model.patch_size': 3 is not one of 1, 2, 4, 8"),
    ("model.num_heads=5", "config key 'model.num_heads': 5 does not divide model.hidden_size=64"),
    ("model.hidden_size=66", "config key 'model.num_heads': 4 does not divide model.hidden_size=66"),
], ids=["patch", "heads", "width"])
def test_dit_fields_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(UNetRunConfig, "unet", "dit-tiny", [override])


def test_dit_cross_field_rules():
    # The DiT presets read masks as concatenated channels; other mask modes are refused.
    assert load_config(UNetRunConfig, "unet", "dit-tiny", ["cond.type=mask"]).cond.mask_mode == "concat"
    with pytest.raises(ConfigError, match="config key 'cond.mask_mode': model.arch=dit has no cross-attention"):
        load_config(UNetRunConfig, "unet", "dit-tiny", ["cond.type=mask", "cond.mask_mode=both"])
    with pytest.raises(ConfigError, match="config key 'model.hidden_size': must be a multiple of 4"):
        load_config(UNetRunConfig, "unet", "dit-tiny", ["model.hidden_size=6", "model.num_heads=3"])
    with pytest.raises(ConfigError, match="config key 'init_from': .* needs model.arch=dit"):
        load_config(UNetRunConfig, "unet", "tiny", ["init_from=somewhere"])
    # The UNet's own rules do not apply to a DiT: model.arch=dit switches the section, which has no UNet field
    # (before, it held them unread and unchecked).
    assert not hasattr(load_config(UNetRunConfig, "unet", "dit-tiny").model, "attention_levels")
    with pytest.raises(ConfigError, match="unknown config key 'model.attention_levels'"):
        load_config(UNetRunConfig, "unet", "dit-tiny", ["model.attention_levels=9"])
    cfg = load_config(UNetRunConfig, "unet", "dit-tiny", ["model.patch_size=8", "objective=flow"])
    # what train_unet derives from a f2 VAE: 32 px -> 16 latents
    assert sizes_problem(cfg, sizes_of(cfg, downsample=2)) is None
    message = "model.patch_size=8 does not divide the latent size 4"   # a f8 VAE: 4 latents
    assert re.search(message, sizes_problem(cfg, sizes_of(cfg, downsample=8)) or "")
    with pytest.raises(ConfigError, match=message):
        network_sizes(cfg, VAEConfig())


def test_exports_and_checkpoints_written_before_model_arch_existed_still_load(tmp_path):
    # An export of the earlier (flat model section) layout, written by the code before the restructuring
    # (tests/fixtures/f0126e0: a class-conditional tiny UNet, shortcut M=8, 16 px images, a f2 VAE, 3 classes);
    # the fields that came with model.arch are removed from it below, as they were from a fresh export before.
    folder = Path(shutil.copytree(OLD_FIXTURE / "unet_class" / "unet_ema", tmp_path / "unet"))
    cfg = load_config(UNetRunConfig, "unet", "tiny", ["model.base_channels=8", "model.channel_mult=1,2",
                                                      "model.head_dim=8", "model.context_dim=8", "model.norm_groups=4",
                                                      "data.image_size=16", "cond.type=class"])
    run_sizes = to_dict(sizes_of(cfg, downsample=2, num_classes=3))
    config = json.loads((folder / "config.json").read_text())
    new_fields = ("arch", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "time_freq_shift")
    for model in (config["model"], config["run_config"]["model"]):
        for name in new_fields:
            del model[name]
    del config["run_config"]["init_from"]
    (folder / "config.json").write_text(json.dumps(config))
    assert isinstance(load_network(folder), UNet)
    saved = {"script": "train_unet", "config": config["run_config"]}
    RunIdentity("train_unet", cfg, ("model",), sizes=run_sizes).check(saved, folder)
    # The missing model.arch reads as its default 'unet' (not None: the identity check always fills in defaults
    # now, there is no check without them), so it is still compared: a DiT run cannot continue it.
    dit = load_config(UNetRunConfig, "unet", "dit-tiny", ["data.image_size=16", "cond.type=class"])
    with pytest.raises(CheckpointError, match="model.arch: 'unet' != 'dit'"):
        RunIdentity("train_unet", dit, ("model",), sizes=run_sizes).check(saved, folder)


# ----------------------------------------------------------------------------- init_from refusals

def test_init_from_refuses_pickles_without_unpickling_them(tmp_path):
    from test_reliability import Payload
    marker = tmp_path / "unpickled"
    torch.save({"model": Payload(marker)}, tmp_path / "DiT-XL-2-256x256.pt")
    folder = tmp_path / "bin_only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel", "patch_size": 2,
                                                    "norm_type": "ada_norm_zero"}))
    torch.save({"model": Payload(marker)}, folder / "diffusion_pytorch_model.bin")
    for path in (tmp_path / "DiT-XL-2-256x256.pt", folder):
        cfg = load_config(UNetRunConfig, "unet", "dit-tiny", [f"init_from={path}"])
        model = network_of(cfg)
        with pytest.raises(ModelFolderError, match=r"not a plain state dict of tensors \(torch.load\(weights_only=True\) "
                                                   r"refused it, so none of it ran: Unsupported global: GLOBAL io.open"):
            load_init_weights(model, cfg, model.sizes)
    assert not marker.exists()


@pytest.mark.parametrize("overrides, classes, message", [
    (["model.hidden_size=64"], NUM_CLASSES, "the checkpoint has model.hidden_size=32, this run model.hidden_size=64"),
    (["model.depth=3"], NUM_CLASSES, "the checkpoint has model.depth=2, this run model.depth=3"),
    ([], 3, r"the checkpoint has 5 classes, this run 3 \(the data's\)"),   # was cond.num_classes=3
], ids=["hidden", "depth", "classes"])
def test_init_from_that_does_not_fit_names_the_key(overrides, classes, message, tmp_path):
    pytest.importorskip("diffusers")
    diffusers_dit(tmp_path / "d")
    with pytest.raises(ModelFolderError, match=message):
        converted(tmp_path / "d", CLASSES, *overrides, num_classes=classes)


# ----------------------------------------------------------------------------- through train_unet.py and sample.py

@pytest.fixture(scope="module")
def dit_runs(shapes_dir, tiny_vae_run, tmp_path_factory):
    """A class-conditional shortcut DiT (dit-tiny, M = 8) trained 4 steps straight, and the same run
    split 2 + 2 by --resume (the helper's --config tiny is overridden: argparse keeps the last)."""
    root = tmp_path_factory.mktemp("dit_runs")
    common = ["--config", "dit-tiny", "cond.type=class", "train.checkpoint_every=2", "train.image_log_every=4",
              "train.log_every=2", f"cache_dir={root / 'cache'}"]
    train(shapes_dir, tiny_vae_run, root / "straight", "--max-steps", "4", *common)
    train(shapes_dir, tiny_vae_run, root / "split", "--max-steps", "2", *common)
    train(shapes_dir, tiny_vae_run, root / "split", "--max-steps", "4", "--resume", "latest", *common)
    return root


def test_resumed_dit_run_equals_the_straight_one(dit_runs):
    for folder in ("unet", "unet_ema"):
        assert_same_weights(dit_runs / "straight" / folder, dit_runs / "split" / folder)
    assert isinstance(load_network(dit_runs / "straight" / "unet_ema"), DiT)
    assert list((dit_runs / "straight" / "images").glob("*.png"))


@pytest.mark.parametrize("steps", [1, 4])
def test_sample_py_draws_a_trained_dit_as_the_shortcut_sampler_says(steps, dit_runs, tmp_path):
    """sample.py's images against the sampler written out here: x <- x + f(x, i / S, level log2 S) / S
    from each image's seed noise, then the frozen VAE's decoder."""
    out = tmp_path / f"s{steps}"
    sample.main(["--unet", str(dit_runs / "straight"), "--out", str(out), "--num-samples", "3", "--steps",
                 str(steps), "--seed", "7"])
    model, vae = load_network(dit_runs / "straight" / "unet_ema"), load_vae(dit_runs / "straight" / "frozen_vae")
    x = initial_noise([image_seed(7, i) for i in range(3)], (4, 16, 16))
    labels = torch.arange(3) % 3                  # --class-label all: classes in turn
    level = torch.full((3,), steps.bit_length() - 1)
    with torch.no_grad():
        for i in range(steps):
            x = x + model(x, torch.full((3,), i / steps), level=level, cond=labels) / steps
        expected = to_uint8(vae.decode(x / vae.config.scale_factor).clamp(-1, 1))
    for i in range(3):
        made = np.asarray(Image.open(out / f"{i:06d}.png"), dtype=np.int16)
        assert np.abs(made - expected[i]).max() <= 1, i


def test_a_converted_diffusers_dit_is_where_fine_tuning_starts(shapes_dir, tiny_vae_run, tmp_path):
    """init_from through train_unet.py: after one step at a negligible learning rate, the exported model
    still computes the diffusers DiT's function, with its new step-size embedding at zero."""
    pytest.importorskip("diffusers")
    # dit-tiny's sizes, the data's classes, its 16x16 latents
    theirs = diffusers_dit(tmp_path / "d", classes=3, heads=4, head_dim=16, sample_size=16)
    train(shapes_dir, tiny_vae_run, tmp_path / "run", "--config", "dit-tiny", "--max-steps", "1", "cond.type=class",
          f"init_from={tmp_path / 'd'}", "model.time_freq_shift=1", "train.lr=1e-12", "train.checkpoint_every=1",
          "train.image_log_every=100", f"cache_dir={tmp_path / 'cache'}")
    model = load_network(tmp_path / "run" / "unet")
    assert model.level_emb.weight.abs().max() < 1e-9
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        expected = theirs(x, t * 1000, class_labels=labels).sample
        ours = model(x, t, level=torch.tensor([0, 2, 3]), cond=labels)
    assert (ours - expected).abs().max() < 1e-5 * expected.abs().max()


@pytest.mark.parametrize("case", ["latent_not_divisible", "pickled_pt", "shapes_do_not_fit"])
def test_bad_dit_input_is_one_line_before_training(case, shapes_dir, tiny_vae_run, tmp_path, capsys):
    pickled = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save({"weights": torch.zeros(1)}, pickled)
    if case == "shapes_do_not_fit":
        pytest.importorskip("diffusers")
        diffusers_dit(tmp_path / "d", classes=3)    # hidden 32; dit-tiny has 64
    extra, message = {
        "latent_not_divisible": (["model.patch_size=8", "data.image_size=24"],
                                 "model.patch_size=8 does not divide the latent size 12"),
        "pickled_pt": ([f"init_from={pickled}"], "neither the official DiT layout (no 'x_embedder.proj.weight'; its first key "
                                                       "is 'weights')"),
        "shapes_do_not_fit": ([f"init_from={tmp_path / 'd'}"], "the checkpoint has model.hidden_size=32, this run "
                                                               "model.hidden_size=64"),
    }[case]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_unet.main, ["--config", "dit-tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run),
                                  "--output-dir", str(out), "--report-to", "none", "cond.type=class",
                                  f"cache_dir={tmp_path / 'cache'}", *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "cache").exists() and not (out / "checkpoints").exists()
