"""Config presets, dotted overrides and their error messages."""
import dataclasses
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import sizes_of

from modules.config.io import diff_fields, from_dict, load_config, to_dict
from modules.config.schema import ConfigError, UNetRunConfig, VAERunConfig, network_sizes, sizes_problem
from modules.core.networks.denoiser import NetworkInputs
from modules.core.networks.vae import VAEConfig


def test_presets_load_and_round_trip():
    for cls, stage, name in [(VAERunConfig, "vae", "tiny"), (VAERunConfig, "vae", "kl-f8"),
                             (UNetRunConfig, "unet", "tiny"), (UNetRunConfig, "unet", "seed"),
                             (UNetRunConfig, "unet", "sd15")]:
        cfg = load_config(cls, stage, name)
        assert from_dict(cls, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_kl_f8_is_the_sd_recipe():
    cfg = load_config(VAERunConfig, "vae", "kl-f8")
    assert cfg.model.base_channels == 128 and cfg.model.channel_mult == (1, 2, 4, 4)
    assert cfg.model.num_res_blocks == 2 and cfg.model.latent_channels == 4
    assert cfg.model.downsample_factor == 8 and cfg.loss.kl_weight == 1e-6


def test_overrides_are_typed():
    cfg = load_config(UNetRunConfig, "unet", "tiny",
                      ["train.lr=2e-4", "model.channel_mult=1,2,4", "model.attention_levels=[2]",
                       "shortcut.bootstrap_cfg=true", "cond.type=class", "train.max_steps=1e3"])
    assert cfg.train.lr == 2e-4 and cfg.model.channel_mult == (1, 2, 4)
    assert cfg.model.attention_levels == (2,) and cfg.shortcut.bootstrap_cfg is True
    assert cfg.cond.type == "class" and cfg.train.max_steps == 1000


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("nosuch=1", "unknown config key 'nosuch'"),
    ("train.lr=abc", "config key 'train.lr': expected float"),
    ("train.batch_size=2.5", "config key 'train.batch_size': expected int"),
    ("train.hflip=maybe", "unknown config key 'train.hflip'"),
    ("data.hflip=maybe", "config key 'data.hflip': expected bool"),
    ("model.base_channels=-8", "config key 'model.base_channels': must be > 0"),
    ("objective=diffusion", "config key 'objective': 'diffusion' is not one of"),
    ("shortcut.denoise_timesteps=100", "must be a power of two"),
    ("train=3", "is a section"),
    ("train.lr", "not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(UNetRunConfig, "unet", "tiny", [override])


def test_vae_image_size_must_divide_by_downsampling():
    with pytest.raises(ConfigError, match="data.image_size.*not divisible.*8"):
        load_config(VAERunConfig, "vae", "kl-f8", ["data.image_size=100"])


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="presets: .*tiny"):
        load_config(VAERunConfig, "vae", "nope")


def test_diff_fields_names_mismatches():
    a = to_dict(load_config(UNetRunConfig, "unet", "tiny"))
    b = to_dict(load_config(UNetRunConfig, "unet", "tiny", ["model.base_channels=64"]))
    assert diff_fields(a, b) == ["model.base_channels: 32 != 64"]


KEYS = ["train.lr", "train.batch_size", "model.channel_mult", "data.hflip", "objective", "cond.type",
        "shortcut.denoise_timesteps", "train", "nosuch.key", "model", ""]


@settings(max_examples=150, deadline=None)
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=20)),
       value=st.one_of(st.text(max_size=20), st.integers().map(str), st.floats().map(str)))
def test_random_overrides_parse_or_name_the_problem(key, value):
    """Whatever the words, the parser either accepts them or raises ConfigError - nothing else."""
    try:
        load_config(UNetRunConfig, "unet", "tiny", [f"{key}={value}"])
    except ConfigError as e:
        assert str(e)


@pytest.mark.parametrize("override, message", [
    ("cond.drop=1.5", "config key 'cond.drop': must be in [0, 1], got 1.5"),
    ("ema.decay=1", "config key 'ema.decay': must be in [0, 1), got 1.0"),
    ("train.seed=-1", "config key 'train.seed': must be >= 0"),
    ("model.base_channels=1000000000", "config key 'model.base_channels': must be <= 8192"),
    ("sample.steps=1,3", "config key 'sample.steps': shortcut sampling needs a power of two"),
    ("sample.steps=16", "exceeds the trained maximum of 8"),
])
def test_each_field_has_its_own_rules(override, message):
    """Rules come from each field's declaration (not from its name), all at start-up."""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(UNetRunConfig, "unet", "tiny", [override])


def test_ddpm_sample_steps_are_checked_against_the_schedule():
    with pytest.raises(ConfigError, match="sample.steps.*2000 steps: must be <= the schedule's 1000"):
        load_config(UNetRunConfig, "unet", "tiny", ["objective=ddpm", "sample.steps=1,2000"])


def test_saved_configs_are_validated_like_command_line_ones():
    values = to_dict(load_config(UNetRunConfig, "unet", "tiny"))
    values["model"]["base_channels"] = -8
    with pytest.raises(ConfigError, match="config key 'model.base_channels': must be > 0"):
        from_dict(UNetRunConfig, values)
    for junk in ([1, 2], "text", None):
        with pytest.raises(ConfigError, match="expected a JSON object"):
            from_dict(UNetRunConfig, junk)


@pytest.mark.parametrize("overrides, message", [
    (["objective=meanflow", "train.gradient_checkpointing=true"],
     "'train.gradient_checkpointing': cannot be used with objective=meanflow: torch's checkpointing does not "
     "recompute the forward-mode"),
    (["objective=meanflow", "meanflow.omega=2"], "'meanflow.omega': guidance .* needs a conditional model"),
    (["objective=meanflow", "train.channels_last=true"],
     "'train.channels_last': cannot be used with objective=meanflow on the UNet: torch's forward-mode"),
    (["objective=meanflow", "cond.type=class", "meanflow.omega=2", "cond.drop=0"],
     "'cond.drop': must be above 0 for the guidance objective=meanflow trains in"),
    (["cond.type=text", "shortcut.intrinsic_guidance=true", "cond.drop=0"],
     "'cond.drop': must be above 0 for the guidance objective=shortcut trains in"),
    (["cond.type=mask", "shortcut.bootstrap_cfg=true", "cond.drop=0"],
     "'cond.drop': must be above 0 for the guidance objective=shortcut trains in"),
    (["objective=meanflow", "meanflow.guidance_interval=0.8,0.2"],
     "'meanflow.guidance_interval': must be two times 0 <= low < high <= 1, got \\(0.8, 0.2\\)"),
    (["objective=meanflow", "meanflow.equal_fraction=1.5"], "'meanflow.equal_fraction': must be in \\[0, 1\\]"),
    (["objective=meanflow", "meanflow.loss_eps=0"], "'meanflow.loss_eps': must be > 0"),
    (["shortcut.intrinsic_guidance=true"], "'shortcut.intrinsic_guidance': needs a conditional model"),
    (["cond.type=class", "shortcut.intrinsic_guidance=true", "shortcut.bootstrap_cfg=true"],
     "'shortcut.bootstrap_cfg': and shortcut.intrinsic_guidance are two ways"),
    (["cond.type=class", "shortcut.intrinsic_guidance=true", "shortcut.guidance_range=1.5,3"],
     "'shortcut.guidance_range': must include 1"),
    (["cond.type=class", "shortcut.intrinsic_guidance=true", "shortcut.guidance_range=3,1"],
     "'shortcut.guidance_range': must be two guidance scales 0 <= low <= high <= 100"),
    (["cond.type=class", "shortcut.intrinsic_guidance=true", "sample.cfg_scale=4"],
     "'sample.cfg_scale': guidance scale 4.0: this model takes the scale as an input"),
    (["objective=flow", "cond.type=class", "shortcut.intrinsic_guidance=true"],
     "'shortcut.intrinsic_guidance': is a switch of objective=shortcut, got objective=flow"),
    (["objective=meanflow", "shortcut.wavelet_levels=2"], "'shortcut.wavelet_levels': is a switch of objective=shortcut"),
    (["meanflow.drop_rows=random"], "'meanflow.drop_rows': is a switch of objective=meanflow, got objective=shortcut"),
    (["objective=meanflow", "meanflow.drop_rows=last"], "'meanflow.drop_rows': 'last' is not one of first, random"),
    (["cond.type=mask", "train.ot_pairing=true"], "'train.ot_pairing': cannot pair noise with mask-conditioned data: "
     "pairing runs within each class, .* masks have no classes"),
    (["cond.type=text", "cond.text_encoder=clip", "train.ot_pairing=true"],
     "'train.ot_pairing': cannot pair noise with text-conditioned data: .* prompts have no classes"),
    (["train.ot_pairing=true", "train.ot_pool=64", "train.batch_size=64"],
     "'train.ot_pool': 64 micro-batches of train.batch_size=64 make 4096 rows; one exact assignment is limited "
     "to 2048"),
])
def test_meanflow_and_ism_bad_inputs(overrides, message):
    with pytest.raises(ConfigError, match="config key " + message):
        load_config(UNetRunConfig, "unet", "tiny", overrides)


def network_inputs(cfg):
    """What the network of ``cfg`` embeds besides x and t (was cfg.step_input, num_step_levels, guidance_input)."""
    return cfg.objective_class.network_inputs(cfg.objective_cfg)


def test_network_inputs_that_do_not_fit_the_objective_are_refused():
    """Was: the overrides model.step_input=interval and model.guidance_input=true refused by the config. Those
    derived fields are now the network's sizes (Sizes.inputs), no longer config keys; sizes_problem refuses
    inputs that do not fit the objective (where a run derives them and where an export's are read back)."""
    cfg = load_config(UNetRunConfig, "unet", "tiny")
    sizes = sizes_of(cfg)
    assert sizes_problem(cfg, sizes) is None
    interval = dataclasses.replace(sizes, inputs=NetworkInputs(step="interval"))
    assert re.search(r"inputs .*step='interval'.* do not fit objective=shortcut", sizes_problem(cfg, interval) or "")
    guided = dataclasses.replace(sizes, inputs=dataclasses.replace(sizes.inputs, guidance=True))
    assert re.search(r"inputs .*guidance=True.* do not fit objective=shortcut", sizes_problem(cfg, guided) or "")
    for override in ("model.step_input=interval", "model.guidance_input=true"):
        with pytest.raises(ConfigError, match="unknown config key"):
            load_config(UNetRunConfig, "unet", "tiny", [override])


def test_ism_and_meanflow_settings_that_fit_are_accepted():
    cfg = load_config(UNetRunConfig, "unet", "tiny", ["cond.type=class", "shortcut.intrinsic_guidance=true",
                                                     "shortcut.wavelet_levels=2", "train.ot_pairing=true",
                                                     "train.ot_pool=4", "sample.cfg_scale=2"])
    assert network_inputs(cfg).guidance and network_inputs(cfg).step == "level"
    dit = load_config(UNetRunConfig, "unet", "dit-tiny", ["objective=meanflow", "train.channels_last=true",
                                                         "cond.type=class", "meanflow.omega=2"])
    assert dit.train.channels_last and dit.meanflow.guided
    unguided = load_config(UNetRunConfig, "unet", "tiny", ["cond.type=class", "cond.drop=0", "sample.cfg_scale=2"])
    assert unguided.cond.drop == 0   # sample.py refuses its guidance (tests/test_sample.py); the model loads


def test_fid_during_training_needs_two_samples():
    fid = ["eval.every=10", "eval.reference=ref.npz", "eval.inception=x.pt", "eval.inception_sha256=ab"]
    with pytest.raises(ConfigError, match="config key 'eval.num_samples': must be >= 2 for FID"):
        load_config(UNetRunConfig, "unet", "tiny", [*fid, "eval.num_samples=1"])
    assert load_config(UNetRunConfig, "unet", "tiny", ["eval.num_samples=1"]).eval.num_samples == 1   # no FID
    cfg = load_config(UNetRunConfig, "unet", "tiny", ["objective=meanflow", "cond.type=mask", "meanflow.omega=2",
                                                     "meanflow.kappa=0.5"])   # model.step_input: now derived
    inputs = network_inputs(cfg)
    assert inputs.step == "interval" and inputs.levels == 0 and not inputs.guidance


def test_vae_refuses_ot_pairing():
    with pytest.raises(ConfigError, match="'train.ot_pairing': is a stage-2"):
        load_config(VAERunConfig, "vae", "tiny", ["train.ot_pairing=true"])


def test_wavelet_levels_must_fit_the_latents():
    cfg = load_config(UNetRunConfig, "unet", "tiny", ["shortcut.wavelet_levels=3"])
    message = "shortcut.wavelet_levels=3 Haar levels .* size 4 is not divisible by 8"
    # a VAE with factor 8: 32 px / 8 = 4x4 latents: two halvings at most
    assert re.search(message, sizes_problem(cfg, sizes_of(cfg, downsample=8)) or "")
    with pytest.raises(ConfigError, match=message):
        network_sizes(cfg, VAEConfig())
