"""The UNet (modules/core/networks/unet.py) and the condition encoders (modules/core/networks/denoiser.py): shapes, embeddings, conditioning with null condition, export."""
import dataclasses
import json
import math
import re

import pytest
import torch
from support import sizes_of

from modules.config.io import load_config, validate
from modules.config.schema import ConfigError, DataConfig, UNetRunConfig, network_sizes, sizes_problem
from modules.core.attention import reset_attention_backends
from modules.core.networks.denoiser import CondConfig, NetworkInputs, Sizes, count_parameters, timestep_embedding
from modules.core.networks.unet import UNet, UNetConfig
from modules.core.networks.vae import VAEConfig
from modules.errors import ModelFolderError
from modules.run.export import load_network, save_network

TINY = UNetConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                  head_dim=16, context_dim=32, norm_groups=8)
LATENT = 8           # latent side used in these tests
DOWNSAMPLE = 2       # image px per latent px for mask conditioning in these tests


def sizes(cond: CondConfig = CondConfig(), num_classes: int = 0, num_step_levels: int = 0) -> Sizes:
    """What these tests build networks for: 4 x LATENT x LATENT latents of DOWNSAMPLE-times larger images,
    ``num_classes`` classes (class conditions only) and a step-level table of ``num_step_levels`` entries
    (0: no step input)."""
    inputs = NetworkInputs(step="level", levels=num_step_levels) if num_step_levels else NetworkInputs()
    return Sizes(latent_channels=4, latent_size=LATENT, image_downsample=DOWNSAMPLE,
                 num_classes=num_classes if cond.type == "class" else 0, inputs=inputs)


def tiny(cond: CondConfig = CondConfig(), num_classes: int = 0, num_step_levels: int = 0, **model_changes) -> UNet:
    torch.manual_seed(0)
    return UNet(dataclasses.replace(TINY, **model_changes), cond, sizes(cond, num_classes, num_step_levels))


def perturbed(model: UNet, seed: int = 1) -> UNet:
    """Move every weight off its init: zero-initialised output layers would make every output 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, LATENT, LATENT, generator=g), torch.rand(batch, generator=g)


def masks(batch: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    side = LATENT * DOWNSAMPLE
    return (torch.rand(batch, 1, side, side, generator=g) < density).float()


def half_masks(batch: int, side_index: int) -> torch.Tensor:
    """Left (0) or right (1) half foreground: same content, different place."""
    side = LATENT * DOWNSAMPLE
    mask = torch.zeros(batch, 1, side, side)
    mask[..., side_index * side // 2:(side_index + 1) * side // 2] = 1
    return mask


def mask_cond(mode: str) -> CondConfig:
    return CondConfig(type="mask", mask_mode=mode, mask_channels=16)


def test_output_shape_zero_at_init_then_nonzero():
    model = tiny().eval()
    x, t = inputs()
    with torch.no_grad():
        out = model(x, t)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.count_nonzero(out) == 0  # conv_out is zero-initialised
        out = perturbed(model)(x, t)
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3


def test_sinusoid_of_t_times_1000_separates_nearby_times():
    dim = 32
    emb = timestep_embedding(torch.tensor([0.01, 0.02]), dim)
    cos = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0).item()
    # Each (cos, sin) pair has norm 1, so the cosine similarity is mean_i cos(1000 * (0.02 - 0.01) * f_i).
    freqs = [10000 ** (-i / (dim // 2)) for i in range(dim // 2)]
    expected = sum(math.cos(10.0 * f) for f in freqs) / len(freqs)
    assert abs(cos - expected) < 1e-6
    # Threshold 0.8: the raw-[0, 1] embedding (the seed's bug) sits at 1 - 5e-6, the 1000x one at 0.63.
    assert cos < 0.8
    raw = timestep_embedding(torch.tensor([0.01, 0.02]) / 1000, dim)
    assert torch.nn.functional.cosine_similarity(raw[0], raw[1], dim=0).item() > 0.9999


def test_model_time_embedding_is_mlp_of_scaled_sinusoid():
    model = tiny()
    t = torch.tensor([0.01, 0.02, 0.5])
    assert torch.equal(model.time_embedding(t), model.time_mlp(timestep_embedding(t, TINY.base_channels)))
    x, _ = inputs(3)
    model = perturbed(model)
    with torch.no_grad():
        a, b = model(x, torch.full((3,), 0.01)), model(x, torch.full((3,), 0.02))
    assert (a - b).abs().mean() > 0.05 * a.abs().mean()


def test_class_drop_equals_null_label_whatever_the_label():
    cond = CondConfig(type="class")
    model = perturbed(tiny(cond, num_classes=5))
    x, t = inputs(3)
    everything_dropped = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        null = model(x, t, cond=torch.full((3,), 5))
        assert torch.equal(model(x, t, cond=None), null)
        assert torch.equal(model(x, t, cond=torch.tensor([0, 1, 2]), drop=everything_dropped), null)
        assert torch.equal(model(x, t, cond=torch.tensor([4, 3, 3]), drop=everything_dropped), null)
        a = model(x, t, cond=torch.tensor([0, 1, 2]), drop=torch.tensor([False, True, False]))
        b = model(x, t, cond=torch.tensor([4, 3, 2]))
    assert torch.allclose(a[1], null[1], atol=1e-6)
    assert (a[0] - b[0]).abs().max() > 1e-3     # the label matters when kept
    assert torch.allclose(a[2], b[2], atol=1e-6)


def test_dropped_class_label_gets_no_gradient():
    model = perturbed(tiny(CondConfig(type="class"), num_classes=5)).train()
    x, t = inputs(2)
    model(x, t, cond=torch.tensor([1, 3]), drop=torch.tensor([True, False])).square().sum().backward()
    grad = model.conditioner.label_emb.weight.grad
    assert grad[1].abs().sum() == 0 and grad[3].abs().sum() > 0 and grad[5].abs().sum() > 0


def test_cross_attention_exists_only_with_context():
    def cross_layers(model):
        return [n for n, _ in model.named_modules() if n.endswith("attn2") and _ is not None]

    assert cross_layers(tiny()) == []
    assert cross_layers(tiny(mask_cond("concat"))) == []
    assert len(cross_layers(tiny(CondConfig(type="class"), num_classes=3))) == 4  # level-1 down, mid, 2x up
    assert len(cross_layers(tiny(mask_cond("both")))) == 4


@pytest.mark.parametrize("mode", ["crossattn", "concat", "both"])
def test_mask_conditioning_depends_on_mask_unless_dropped(mode):
    model = perturbed(tiny(mask_cond(mode)))
    x, t = inputs(2)
    m1, m2 = masks(2, density=0.2), masks(2, density=0.8)
    drop_first = torch.tensor([True, False])  # sample 0 dropped, sample 1 kept
    with torch.no_grad():
        a, b = model(x, t, cond=m1), model(x, t, cond=m2)
        left, right = model(x, t, cond=half_masks(2, 0)), model(x, t, cond=half_masks(2, 1))
        null = model(x, t, cond=None)
        d1, d2 = model(x, t, cond=m1, drop=drop_first), model(x, t, cond=m2, drop=drop_first)
    # Float32 noise here is ~1e-6. Cross-attention at random init is close to uniform, so a
    # crossattn-only model reacts weakly (~2e-3) yet clearly; 1e-4 separates signal from noise.
    assert (a - b).abs().max() > 1e-4 and (a - null).abs().max() > 1e-4
    assert (left - right).abs().max() > 1e-4   # where the mask is matters, not only what it holds
    assert torch.allclose(d1[0], null[0], atol=1e-6) and torch.allclose(d2[0], null[0], atol=1e-6)
    assert torch.allclose(d1[1], a[1], atol=1e-6) and torch.allclose(d2[1], b[1], atol=1e-6)


def test_dropped_mask_is_never_read():
    model = perturbed(tiny(mask_cond("both"))).train()
    x, t = inputs(2)
    poisoned = masks(2, density=0.5)
    poisoned[0] = float("nan")
    out = model(x, t, cond=poisoned, drop=torch.tensor([True, False]))
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("cond", [CondConfig(), CondConfig(type="class"), mask_cond("crossattn"),
                                  mask_cond("concat"), mask_cond("both")], ids=lambda c: f"{c.type}-{c.mask_mode}")
def test_every_parameter_takes_part_in_a_training_step(cond):
    """DDP without find_unused_parameters needs this, also when the caller passes no drop mask."""
    model = tiny(cond, num_classes=3, num_step_levels=4).train()   # 3 classes for the class condition
    x, t = inputs(2)
    label = {"none": None, "class": torch.tensor([0, 2]), "mask": masks(2, density=0.5)}[cond.type]
    model(x, t, level=torch.tensor([1, 3]), cond=label).square().mean().backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert unused == []


def test_mask_of_wrong_resolution_is_refused():
    model = tiny(mask_cond("both"))
    x, t = inputs(2)
    with pytest.raises(ValueError, match="latent size x 2, the VAE's factor"):
        model(x, t, cond=torch.zeros(2, 1, LATENT, LATENT))


def test_level_embedding_changes_output_and_is_required():
    model = perturbed(tiny(num_step_levels=4))
    x, t = inputs(2)
    with torch.no_grad():
        a = model(x, t, level=torch.tensor([0, 3]))
        b = model(x, t, level=torch.tensor([3, 3]))
    assert (a[0] - b[0]).abs().max() > 1e-3 and torch.allclose(a[1], b[1], atol=1e-6)
    with pytest.raises(ValueError, match=r"embeds the step size \(4 levels\)"):
        model(x, t)
    with pytest.raises(ValueError, match="level given, but this network embeds no step input"):
        tiny()(x, t, level=torch.tensor([0, 0]))


def test_bad_inputs_are_refused_with_a_message():
    model = tiny()
    x, t = inputs(2)
    with pytest.raises(ValueError, match=r"x must be latents \[B, 4"):
        model(torch.zeros(2, 3, LATENT, LATENT), t)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.zeros(2, 4, 7, 8), t)
    with pytest.raises(ValueError, match="t must be a float tensor"):
        model(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, cond=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class condition"):
        tiny(CondConfig(type="class"), num_classes=3)(x, t, cond=torch.tensor([0.5, 1.0]))


def test_configs_the_network_cannot_be_built_from_are_refused_where_they_are_built():
    with pytest.raises(ConfigError, match="attention_levels"):
        validate(UNetRunConfig(model=dataclasses.replace(TINY, attention_levels=(2,))))
    # The class count is no longer a config field (cond.num_classes): it is a size derived from the data,
    # refused when the network's sizes are derived and when recorded sizes are checked.
    cfg = UNetRunConfig(model=TINY, cond=CondConfig(type="class"), objective="flow")
    assert re.search("a class-conditional model needs at least one class, got 0",
                     sizes_problem(cfg, sizes_of(cfg, num_classes=0)) or "")
    with pytest.raises(ConfigError, match="cond.type=class needs class sub-folders"):
        network_sizes(cfg, VAEConfig(), num_classes=0)


def test_save_load_round_trip_is_exact(tmp_path):
    cond = CondConfig(type="mask", mask_mode="both", mask_channels=16)
    model = perturbed(tiny(cond, num_step_levels=4))
    run = UNetRunConfig(model=TINY, cond=cond, data=DataConfig(image_size=LATENT * DOWNSAMPLE),
                        shortcut=dataclasses.replace(UNetRunConfig().shortcut, denoise_timesteps=8),
                        sample=dataclasses.replace(UNetRunConfig().sample, steps=(1, 8)))
    folder = save_network(tmp_path / "unet", model.state_dict(), run, model.sizes, {"path": "runs/vae"}, weights="ema")
    config = json.loads((folder / "config.json").read_text())
    assert config["kind"] == "unet" and config["objective"] == "shortcut"
    # The step-level count is a derived size now (was model.num_step_levels): recorded under "sizes".
    assert config["sizes"]["inputs"]["levels"] == 4 and config["cond"]["mask_mode"] == "both"
    loaded = load_network(folder)
    x, t = inputs(2)
    args = dict(level=torch.tensor([1, 2]), cond=masks(2, 0.5), drop=torch.tensor([False, True]))
    with torch.no_grad():
        assert torch.equal(model(x, t, **args), loaded(x, t, **args))
    config["model"]["base_channels"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="do not match"):
        load_network(folder)


def test_gradient_checkpointing_and_channels_last_give_the_same_result():
    model = perturbed(tiny(CondConfig(type="class"), num_classes=3)).train()
    x, t = inputs(2)
    label = torch.tensor([0, 2])

    def loss_and_grads():
        model.zero_grad()
        loss = model(x, t, cond=label).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads()
    model.gradient_checkpointing = True
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert torch.allclose(loss, loss_ckpt) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_ckpt))
    model.gradient_checkpointing = False
    model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x.to(memory_format=torch.channels_last), t, cond=label)
        ref = model.to(memory_format=torch.contiguous_format)(x, t, cond=label)
    assert torch.allclose(out, ref, atol=1e-5)


def test_compiles_without_graph_breaks():
    model = perturbed(tiny(mask_cond("both"), num_step_levels=4))
    x, t = inputs(2)
    args = dict(level=torch.tensor([0, 3]), cond=masks(2, 0.5), drop=torch.tensor([True, False]))
    reset_attention_backends()  # the first attention call (backend choice) happens while tracing
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(x, t, **args)
        assert torch.allclose(out, model(x, t, **args), atol=1e-6)


def test_wavelet_resampling_variant_runs():
    model = tiny(resample="wavelet")
    assert not any(type(m).__name__ in ("Downsample", "Upsample") for m in model.modules())
    model = perturbed(model)
    x, t = inputs(2)
    out = model(x, t)
    out.square().mean().backward()
    assert out.shape == x.shape and torch.isfinite(out).all()


def expected_parameter_count(m: UNetConfig, in_channels: int = 4) -> int:
    """Closed-form count of the unconditional, conv-resampling UNet (no level embedding) for
    ``in_channels`` latent channels."""
    def conv(i, o, k):
        return i * o * k * k + o

    def linear(i, o, bias=True):
        return i * o + (o if bias else 0)

    temb = 4 * m.base_channels

    def res(i, o):
        return 2 * i + conv(i, o, 3) + linear(temb, 2 * o) + 2 * o + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

    def transformer(c):
        block = 2 * c + linear(c, 3 * c, bias=False) + linear(c, c) + 2 * c + linear(c, 8 * c) + linear(4 * c, c)
        return 2 * c + 2 * linear(c, c) + m.transformer_depth * block

    base = m.base_channels
    total = linear(base, temb) + linear(temb, temb) + conv(in_channels, base, 3)
    ch, skips = base, [base]
    for level, mult in enumerate(m.channel_mult):
        for _ in range(m.num_res_blocks):
            total += res(ch, base * mult) + (transformer(base * mult) if level in m.attention_levels else 0)
            ch = base * mult
            skips.append(ch)
        if level < len(m.channel_mult) - 1:
            total += conv(ch, ch, 3)
            skips.append(ch)
    total += 2 * res(ch, ch) + transformer(ch)
    for level, mult in reversed(list(enumerate(m.channel_mult))):
        for i in range(m.num_res_blocks + 1):
            total += res(ch + skips.pop(), base * mult)
            total += transformer(base * mult) if level in m.attention_levels else 0
            total += conv(base * mult, base * mult, 3) if level and i == m.num_res_blocks else 0
            ch = base * mult
    return total + 2 * ch + conv(ch, in_channels, 3)


def test_seed_preset_parameter_count():
    cfg = load_config(UNetRunConfig, "unet", "seed")
    # 4 latent channels and no step input, as the old flat config's defaults built it (no level embedding).
    seed_sizes = dataclasses.replace(sizes_of(cfg), inputs=NetworkInputs())
    with torch.device("meta"):
        model = UNet(cfg.model, cfg.cond, seed_sizes)
    n = count_parameters(model)
    print(f"seed preset UNet (cond none, conv resampling): {n:,} parameters")
    assert n == expected_parameter_count(cfg.model)
    assert 440e6 < n < 460e6   # 452,372,164: most of it in the 768-wide levels 3-5
    assert expected_parameter_count(TINY) == count_parameters(tiny())


def test_compiled_training_step_matches_eager_and_compiles_once():
    """train.compile: the shortcut loss and gradients through torch.compile equal eager ones, and
    later steps (new times, levels and dropout) reuse the graphs instead of recompiling. The
    aot_eager backend traces exactly what inductor gets (inductor's CPU build takes minutes here;
    measured once: gradients within 1.6e-7 of eager)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from modules.core.objectives.base import Draws
    from modules.core.objectives.shortcut import Shortcut, ShortcutConfig

    def step(model, seed):
        objective = Shortcut(ShortcutConfig(denoise_timesteps=8), cond_drop=0.2)
        x1 = torch.randn(8, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))
        loss, _ = objective.loss(model, x1, torch.arange(8) % 3, Draws(torch.Generator().manual_seed(seed), seed))
        loss.backward()
        return loss.detach()

    eager = perturbed(tiny(CondConfig(type="class"), num_classes=3, num_step_levels=4)).train()
    compiled_net = perturbed(tiny(CondConfig(type="class"), num_classes=3, num_step_levels=4)).train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(compiled_net, backend=counter)
    assert torch.allclose(step(eager, 0), step(compiled, 0), atol=1e-6)
    for a, b in zip(eager.parameters(), compiled_net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    first = counter.frame_count
    for seed in (1, 2):
        step(compiled, seed)
    assert counter.frame_count == first, f"recompiled: {first} -> {counter.frame_count} frames"
