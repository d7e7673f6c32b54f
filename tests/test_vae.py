"""AutoencoderKL: diffusers / SD weight compatibility, export round trip, wavelet variant, errors."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from modules.core.networks.vae import AutoencoderKL, DiagonalGaussian, Upsample, VAEConfig
from modules.errors import ModelFolderError
from modules.interop.vae import convert_diffusers_state_dict, load_vae
from modules.run.export import save_vae, vae_identity

TINY = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
ATOL = 1e-5


def _image(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every weight off its init value (GroupNorm 1/0, zero biases) so layouts must really match."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _diffusers_vae(norm_groups: int, levels: int = 2):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(
        block_out_channels=(32, 64, 64)[:levels], layers_per_block=1, norm_num_groups=norm_groups,
        latent_channels=4, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, scaling_factor=0.3)
    _perturb(model, seed=1)
    return model.eval()


def _assert_same_function(ours: AutoencoderKL, theirs, size: int = 32) -> None:
    x = _image(size=size)
    with torch.no_grad():
        post_theirs = theirs.encode(x).latent_dist
        post_ours = ours.encode(x)
        assert torch.allclose(post_ours.mean, post_theirs.mean, atol=ATOL, rtol=0)
        assert torch.allclose(post_ours.logvar, post_theirs.logvar, atol=ATOL, rtol=0)
        z = post_theirs.mean + 0.5 * torch.randn(post_theirs.mean.shape, generator=torch.Generator().manual_seed(2))
        decoded = theirs.decode(z).sample
        assert decoded.abs().max() > 0.1      # not a trivially small output
        assert torch.allclose(ours.decode(z), decoded, atol=ATOL, rtol=0)


def test_loads_diffusers_folder_and_matches_outputs(tmp_path):
    theirs = _diffusers_vae(norm_groups=8)
    theirs.save_pretrained(tmp_path / "diffusers_vae", safe_serialization=True)
    ours = load_vae(tmp_path / "diffusers_vae")
    assert ours.config.base_channels == 32 and ours.config.channel_mult == (1, 2)
    assert ours.config.num_res_blocks == 1 and ours.config.norm_groups == 8
    assert ours.config.scale_factor == pytest.approx(0.3)
    _assert_same_function(ours, theirs)


def test_loads_diffusers_pipeline_folder_with_vae_subfolder(tmp_path):
    theirs = _diffusers_vae(norm_groups=8)
    theirs.save_pretrained(tmp_path / "pipeline" / "vae", safe_serialization=True)
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    _assert_same_function(load_vae(tmp_path / "pipeline"), theirs)


def test_loads_old_diffusers_attention_names(tmp_path):
    """Hub checkpoints such as sd-vae-ft-mse use query/key/value/proj_attn (sometimes as 1x1 convs)."""
    theirs = _diffusers_vae(norm_groups=8)
    theirs.save_pretrained(tmp_path / "old", safe_serialization=True)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for key, value in theirs.state_dict().items():
        for new, legacy in renames.items():
            if ".attentions." in key and new in key:
                key = key.replace(new, legacy)
                value = value[:, :, None, None] if value.dim() == 2 else value
        old[key] = value.contiguous()
    assert any(".query." in k for k in old)
    save_file(old, str(tmp_path / "old" / "diffusion_pytorch_model.safetensors"))
    _assert_same_function(load_vae(tmp_path / "old"), theirs)
    assert set(convert_diffusers_state_dict(old)) == set(theirs.state_dict())


def _to_ldm_layout(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """Diffusers keys -> original LDM / SD keys, written independently of modules.vae's mapping."""
    out = {}
    for key, value in sd.items():
        k = key
        for i in range(levels):
            k = k.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            k = k.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            k = k.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.")
            k = k.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")
        k = (k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
             .replace("mid_block.attentions.0.group_norm.", "mid.attn_1.norm.")
             .replace("mid_block.attentions.0.to_q.", "mid.attn_1.q.")
             .replace("mid_block.attentions.0.to_k.", "mid.attn_1.k.")
             .replace("mid_block.attentions.0.to_v.", "mid.attn_1.v.")
             .replace("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out.")
             .replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out"))
        if ".attn_1." in k and k.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]          # LDM stores the projections as 1x1 convs
        out[k] = value.contiguous()
    return out


@pytest.mark.parametrize("prefix", ["", "first_stage_model."])
def test_loads_single_ldm_safetensors_file(tmp_path, prefix):
    # LDM files carry no config: GroupNorm(32) is assumed (SD's), so the reference uses 32 groups.
    levels = 3
    theirs = _diffusers_vae(norm_groups=32, levels=levels)
    ldm = _to_ldm_layout(theirs.state_dict(), levels)
    assert "decoder.up.0.block.0.conv1.weight" in ldm and "encoder.mid.attn_1.q.weight" in ldm
    ldm = {prefix + k: v for k, v in ldm.items()}
    ldm["loss.logvar"] = torch.zeros(())           # LDM checkpoints keep the loss's parameters too
    path = tmp_path / "vae-ft.safetensors"
    save_file(ldm, str(path))
    ours = load_vae(path)
    assert ours.config.channel_mult == (1, 2, 2) and ours.config.scale_factor == pytest.approx(0.18215)
    _assert_same_function(ours, theirs)


def test_export_then_load_is_exact(tmp_path):
    torch.manual_seed(0)
    model = AutoencoderKL(TINY)
    _perturb(model, seed=3)
    model.eval()
    run_config = {"train": {"lr": 1e-3}}
    save_vae(model, tmp_path / "vae", run_config=run_config)
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["kind"] == "vae" and config["run_config"] == run_config
    loaded = load_vae(tmp_path / "vae")
    assert loaded.config == model.config
    x = _image()
    with torch.no_grad():
        a, b = model.encode(x), loaded.encode(x)
        assert torch.equal(a.mean, b.mean) and torch.equal(a.logvar, b.logvar)
        assert torch.equal(model.decode(a.mean), loaded.decode(a.mean))


def test_upsample_equals_nearest_upsample_then_conv():
    torch.manual_seed(0)
    up = Upsample(6)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    up.double()
    expected = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert torch.allclose(up(x), expected, atol=1e-12)


def test_posterior_kl_sample_and_clamp():
    gen = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 4, generator=gen)
    moments[0, 4, 0, 0] = 100.0                         # log-variance above the clamp
    post = DiagonalGaussian(moments)
    assert post.logvar.max().item() == 20.0
    mean, logvar = moments[:, :4], moments[:, 4:].clamp(-30, 20)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)), torch.distributions.Normal(0.0, 1.0))
    assert post.kl().shape == (3,)
    assert torch.allclose(post.kl(), reference.sum(dim=(1, 2, 3)), rtol=1e-5)
    a = post.sample(torch.Generator().manual_seed(5))
    b = post.sample(torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, post.mode())
    assert torch.equal(post.mode(), mean)


def test_forward_trains_and_exposes_last_layer():
    torch.manual_seed(0)
    model = AutoencoderKL(TINY)
    x = _image()
    recon, posterior = model(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape and posterior.mean.shape == (2, 4, 16, 16)
    loss = (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
    grad, = torch.autograd.grad(loss, model.last_layer_weight)
    assert model.last_layer_weight is model.decoder.conv_out.weight and grad.abs().sum() > 0
    recon_mode, _ = model(x, sample_posterior=False)
    with torch.no_grad():
        assert torch.allclose(recon_mode, model.decode(model.encode(x).mean), atol=1e-6)


def test_bf16_autocast_keeps_activations_low_precision_and_close():
    torch.manual_seed(0)
    model = AutoencoderKL(TINY).eval()
    x = _image(batch=1)
    with torch.no_grad():
        reference = model.decode(model.encode(x).mean)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            norm_out = model.encoder.down_blocks[0].resnets[0].norm1(model.encoder.conv_in(x))
            mixed = model.decode(model.encode(x).mean)
    assert norm_out.dtype == torch.bfloat16
    assert (mixed.float() - reference).abs().max() < 0.05 * reference.abs().max()


def test_wavelet_variant_shapes_and_downsampling_factor():
    torch.manual_seed(0)
    cfg = VAEConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8,
                    resample="wavelet")
    model = AutoencoderKL(cfg)
    assert any(k.startswith("encoder.down_blocks.0.downsamplers.0.gate.") for k in model.state_dict())
    x = _image(size=32)
    recon, posterior = model(x)
    assert recon.shape == x.shape
    assert posterior.mean.shape == (2, 4, 32 // cfg.downsample_factor, 32 // cfg.downsample_factor)
    assert cfg.downsample_factor == 4
    recon.abs().mean().backward()
    gate_grad = model.decoder.up_blocks[0].upsamplers[0].gate.expand.weight.grad
    assert gate_grad is not None and gate_grad.abs().sum() > 0


def test_refuses_image_of_wrong_size():
    model = AutoencoderKL(TINY)
    with pytest.raises(ValueError, match="divisible by 2"):
        model.encode(torch.zeros(1, 3, 31, 32))


def test_load_refuses_pickle_file(tmp_path):
    path = tmp_path / "vae.ckpt"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFolderError, match=str(path)):
        load_vae(path)


def test_load_refuses_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(ModelFolderError, match=str(tmp_path)):
        load_vae(tmp_path)
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_vae(tmp_path / "nowhere")


def test_load_refuses_other_model_kinds(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"kind": "unet"}))
    with pytest.raises(ModelFolderError, match="'unet'"):
        load_vae(tmp_path)


def test_a_kind_of_null_is_named_as_such_not_as_a_none_model(tmp_path):
    """m5: a VAE (or UNet) config.json with "kind": null said "holds a 'None' model"."""
    from modules.run.export import read_config
    (tmp_path / "config.json").write_text(json.dumps({"kind": None, "model": {}}))
    for load in (load_vae, lambda folder: read_config(folder, kind="unet")):
        with pytest.raises(ModelFolderError) as err:
            load(tmp_path)
        assert "'kind': null" in str(err.value) and "None" not in str(err.value), err.value


def test_load_names_keys_that_do_not_fit(tmp_path):
    model = AutoencoderKL(TINY)
    save_vae(model, tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config["model"]["mid_attention"] = False
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=r"20 unexpected: decoder\.mid_block\.attentions\.0\."):
        load_vae(tmp_path / "vae")
    config["model"]["mid_attention"] = True
    config["model"]["latent_channels"] = 8
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="shape"):
        load_vae(tmp_path / "vae")


def test_load_refuses_unsupported_diffusers_config(tmp_path):
    theirs = _diffusers_vae(norm_groups=8)
    theirs.save_pretrained(tmp_path / "d", safe_serialization=True)
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    config["act_fn"] = "gelu"
    (tmp_path / "d" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="'act_fn' = 'gelu': only silu is supported"):
        load_vae(tmp_path / "d")


# ----------------------------------------------------------------------------- today's VAEs and their normalisation

def _diffusers_kind(kind: str):
    """A tiny random diffusers AutoencoderKL shaped like ``kind``'s: SD3/FLUX (16 channels, a shift, no quant
    convs; their scaling and shift factors) or SDXL-style (per-channel latents_mean / latents_std)."""
    diffusers = pytest.importorskip("diffusers")
    shaped = {"sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                          use_post_quant_conv=False),
              "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                           use_post_quant_conv=False),
              "sdxl_stats": dict(latent_channels=4, scaling_factor=0.5, latents_mean=[0.86488, -0.27787, 0.21617, 0.37384],
                                 latents_std=[4.85504, 5.31922, 3.93725, 3.98700])}[kind]
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                    down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, **shaped)
    _perturb(model, seed=1)
    return model.eval()


@pytest.mark.parametrize("kind", ["sd3", "flux", "sdxl_stats"])
def test_todays_diffusers_vaes_load_and_normalise_as_the_pipelines_do(kind, tmp_path):
    theirs = _diffusers_kind(kind)
    theirs.save_pretrained(tmp_path / kind, safe_serialization=True)
    ours = load_vae(tmp_path / kind)
    c = theirs.config
    assert ours.config.latent_channels == c.latent_channels
    assert (ours.quant_conv is None) == (not c.use_quant_conv)
    _assert_same_function(ours, theirs)
    z = theirs.encode(_image()).latent_dist.mean.detach()
    if c.latents_mean is not None:
        # pipeline_stable_diffusion_xl_img2img.py (encode) and pipeline_stable_diffusion_xl.py (decode)
        mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(c.latents_std).view(1, -1, 1, 1)
        encoded, decoded = (z - mean) * c.scaling_factor / std, z * std / c.scaling_factor + mean
    else:
        # pipeline_stable_diffusion_3_img2img.py / pipeline_flux_img2img.py (encode), pipeline_*.py (decode)
        encoded, decoded = (z - c.shift_factor) * c.scaling_factor, z / c.scaling_factor + c.shift_factor
    assert torch.allclose(ours.normalize(z), encoded, atol=1e-6, rtol=1e-6)
    assert torch.allclose(ours.denormalize(z), decoded, atol=1e-6, rtol=1e-6)
    assert torch.allclose(ours.denormalize(ours.normalize(z)), z, atol=1e-5, rtol=0)
    # the export keeps it: saved and loaded again, the same config and identity
    save_vae(ours, tmp_path / "ours")
    again = load_vae(tmp_path / "ours")
    assert again.config == ours.config and vae_identity(again) == vae_identity(ours)


def test_imf_statistics_normalise_sd_vae_latents_per_channel():
    """EDM2's and the MeanFlow/iMF code's per-channel standardisation: (z - mean) / std, final std 1."""
    mean, std = (0.86488, -0.27787, 0.21617, 0.37384), (4.85504, 5.31922, 3.93725, 3.98700)
    vae = AutoencoderKL(dataclasses.replace(TINY, latents_mean=mean, latents_std=std))
    z = torch.randn(2, 4, 4, 4)
    expected = (z - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
    assert torch.allclose(vae.normalize(z), expected, atol=1e-6, rtol=0)


def test_sd_style_normalisation_is_the_scale_alone_bit_for_bit():
    vae = AutoencoderKL(dataclasses.replace(TINY, scale_factor=0.18215))
    z = torch.randn(2, 4, 4, 4)
    assert torch.equal(vae.normalize(z), z * 0.18215) and torch.equal(vae.denormalize(z), z / 0.18215)


def test_vaes_written_before_the_new_fields_keep_their_identity():
    """The fixture's exports recorded the identity of the VAE they were trained with, before shift_factor,
    latents_mean/std and the quant-conv switches existed: it is still that VAE's identity."""
    from test_compat import FIXTURE, VAE
    recorded = json.loads((FIXTURE / "unet_class" / "unet_ema" / "config.json").read_text())["vae"]["identity"]
    assert vae_identity(load_vae(VAE)) == recorded


@pytest.mark.parametrize("changes, message", [
    ({"latents_mean": (0.0, 1.0)}, "latents_mean': 2 values for model.latent_channels=4"),
    ({"latents_mean": (0.0,) * 4}, "latents_std': model.latents_mean is given: per-channel statistics need both"),
    ({"latents_std": (1.0, 1.0, 0.0, 1.0), "latents_mean": (0.0,) * 4}, "latents_std': must be > 0"),
    ({"latents_mean": (0.0,) * 4, "latents_std": (1.0,) * 4, "shift_factor": 0.1}, "shift_factor': 0.1 with"),
], ids=["length", "mean_alone", "zero_std", "shift_and_mean"])
def test_bad_normalisation_in_a_vae_config_is_one_line_naming_the_key(changes, message, tmp_path):
    model = AutoencoderKL(TINY)
    save_vae(model, tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config["model"].update({k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()})
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match=re.escape(message)):
        load_vae(tmp_path / "vae")


def test_dc_ae_is_refused_in_one_line(tmp_path):
    (tmp_path / "dcae").mkdir()
    (tmp_path / "dcae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderDC", "latent_channels": 32}))
    with pytest.raises(ModelFolderError, match="DC-AE .* is not supported"):
        load_vae(tmp_path / "dcae")
