"""Models that leave the toolkit: exports that diffusers loads (VAE: AutoencoderKL; a flow/class DiT:
DiTTransformer2DModel) computing our function, the model card every export carries, and publish.py's folder
and Hub calls (HfApi replaced: no network)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from support import network_of

import publish
import sample
from modules.config.cli import run_cli
from modules.config.io import load_config
from modules.config.schema import UNetRunConfig
from modules.core.networks.vae import AutoencoderKL, VAEConfig
from modules.interop.dit import diffusers_dit_problem, diffusers_dit_writer
from modules.interop.vae import load_vae
from modules.run.export import DIFFUSERS_FOLDER, save_network, save_vae, weights_digest
from test_compat import FIXTURE
from test_train_unet import train

diffusers = pytest.importorskip("diffusers")
SD3_SHAPED = VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8, latent_channels=16,
                       scale_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
WITH_STATISTICS = dataclasses.replace(SD3_SHAPED, latent_channels=4, shift_factor=0.0, use_quant_conv=True,
                                      use_post_quant_conv=True, scale_factor=0.5,
                                      latents_mean=(0.86488, -0.27787, 0.21617, 0.37384),
                                      latents_std=(4.85504, 5.31922, 3.93725, 3.98700))


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def card_of(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


# ----------------------------------------------------------------------------- the VAE

@pytest.mark.parametrize("cfg", [SD3_SHAPED, WITH_STATISTICS], ids=["sd3_shaped", "per_channel"])
def test_a_vae_export_loads_in_diffusers_and_computes_the_same_function(cfg, tmp_path):
    torch.manual_seed(0)
    ours = perturbed(AutoencoderKL(cfg))
    save_vae(ours, tmp_path / "vae", run_config={"data": {"image_size": 32, "path": "user/faces"}})
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae", subfolder=DIFFUSERS_FOLDER).eval()
    c = theirs.config
    assert c.scaling_factor == cfg.scale_factor and (c.shift_factor or 0.0) == cfg.shift_factor
    assert (c.latents_mean or []) == list(cfg.latents_mean) and (c.latents_std or []) == list(cfg.latents_std)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mine, their = ours.encode(x), theirs.encode(x).latent_dist
        assert torch.allclose(mine.mean, their.mean, atol=1e-5, rtol=0)
        assert torch.allclose(mine.logvar, their.logvar, atol=1e-5, rtol=0)
        assert torch.allclose(ours.decode(mine.mean), theirs.decode(their.mean).sample, atol=1e-5, rtol=0)
    again = load_vae(tmp_path / "vae")       # our loader reads the folder as before
    assert again.config == ours.config
    # the weights are the same file (linked, not copied)
    weights = (tmp_path / "vae" / "model.safetensors").read_bytes()
    assert (tmp_path / "vae" / DIFFUSERS_FOLDER / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    card = card_of(tmp_path / "vae")
    assert card.data.library_name == "diffusers" and card.data.datasets == ["user/faces"]
    assert "vae" in card.data.tags and card.data.license == "other"
    assert 'subfolder="diffusers"' in card.text


def test_a_wavelet_vae_has_no_diffusers_copy_and_its_card_says_why(tmp_path):
    save_vae(AutoencoderKL(dataclasses.replace(SD3_SHAPED, resample="wavelet")), tmp_path / "vae")
    assert not (tmp_path / "vae" / DIFFUSERS_FOLDER).exists()
    card = card_of(tmp_path / "vae")
    assert card.data.library_name is None and "No diffusers copy: model.resample=wavelet" in card.text


# ----------------------------------------------------------------------------- the DiT

def dit_config(*overrides: str):
    return load_config(UNetRunConfig, "unet", "dit-tiny", ["objective=flow", "cond.type=class",
                                                           "model.time_freq_shift=1", *overrides])


def random_dit(cfg, num_classes: int = 3):
    net = network_of(cfg, num_classes=num_classes)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return net.eval()


@pytest.mark.parametrize("cond", ["class", "none"])
def test_a_flow_dit_exports_to_a_diffusers_dit_computing_the_same_function(cond, tmp_path):
    """diffusers takes the timestep 1000 t; the class model's null label (3) included; an unconditional model
    reads label 0, whose embedding is zero."""
    cfg = dit_config(f"cond.type={cond}")
    net = random_dit(cfg)
    save_network(tmp_path / "unet_ema", net.state_dict(), cfg, net.sizes, {"model": {"scale_factor": 0.5}}, "ema",
                 diffusers=diffusers_dit_writer(cfg, net.sizes))
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "unet_ema" / DIFFUSERS_FOLDER).eval()
    size = net.sizes.latent_size
    x = torch.randn(4, 4, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.3, 0.7, 1.0])
    labels = torch.tensor([0, 1, 2, 3]) if cond == "class" else torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        ours = net(x, t, cond=labels if cond == "class" else None)
        expected = theirs(x, 1000 * t, class_labels=labels).sample
    assert (ours - expected).abs().max() < 1e-6 * expected.abs().max(), (ours - expected).abs().max()
    card = card_of(tmp_path / "unet_ema")
    assert card.data.library_name == "diffusers" and {"dit", "flow-matching"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert "DiTTransformer2DModel.from_pretrained" in card.text and "1000 * t" in card.text


@pytest.mark.parametrize("overrides, num_classes, message", [
    (["objective=shortcut"], 3, "objective=shortcut gives the network a step-size level input"),
    (["objective=meanflow"], 3, "objective=meanflow gives the network an interval input"),
    (["cond.type=text", "cond.text_encoder=clip"], 0, "cond.type=text: it takes class labels only"),
    (["cond.type=mask"], 0, "cond.type=mask: it takes class labels only"),
    (["model.time_freq_shift=0"], 3, "model.time_freq_shift=0 (the DiT code's time sinusoid)"),
    (["model.mlp_ratio=2"], 3, "model.mlp_ratio=2.0: its MLP is 4 x the width"),
], ids=["shortcut", "meanflow", "text", "mask", "time_spacing", "mlp_ratio"])
def test_a_dit_diffusers_cannot_represent_is_refused_in_one_line(overrides, num_classes, message, tmp_path):
    cfg = dit_config(*overrides)
    sizes = network_of(cfg, num_classes=num_classes, text_tokens=5, text_width=8).sizes
    assert message in diffusers_dit_problem(cfg, sizes)


def test_a_unet_export_has_no_diffusers_copy_and_its_card_says_why(tmp_path):
    cfg = load_config(UNetRunConfig, "unet", "tiny", ["objective=flow", "cond.type=class"])
    net = network_of(cfg, num_classes=3)
    save_network(tmp_path / "u", net.state_dict(), cfg, net.sizes, {"model": {"scale_factor": 0.5}}, "online",
                 diffusers=diffusers_dit_writer(cfg, net.sizes))
    assert not (tmp_path / "u" / DIFFUSERS_FOLDER).exists()
    assert "No diffusers copy: model.arch=unet" in card_of(tmp_path / "u").text


# ----------------------------------------------------------------------------- publish.py

class FakeHub:
    """HfApi's two calls publish.py makes, recorded; the uploaded folder is copied before it is removed."""
    calls: list = []

    def __init__(self, fail: bool = False):
        self.fail = fail

    def create_repo(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_repo", repo_id, kwargs))
        if self.fail:
            url = "https://huggingface.co/api/repos/create"
            raise HfHubHTTPError(f"401 Client Error: Unauthorized for url: {url}",
                                 response=httpx.Response(401, request=httpx.Request("POST", url)))

    def upload_folder(self, **kwargs):
        FakeHub.calls.append(("upload_folder", kwargs))
        shutil.copytree(kwargs["folder_path"], FakeHub.uploaded)
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/user/dit/commit/1"})()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    FakeHub.calls, FakeHub.uploaded = [], tmp_path / "uploaded"
    monkeypatch.setattr(publish, "HfApi", FakeHub)
    return FakeHub


@pytest.fixture(scope="module")
def flow_dit_run(shapes_dir, tiny_vae_run, tmp_path_factory) -> Path:
    """A class-conditional flow DiT trained 2 steps through train_unet.py."""
    out = tmp_path_factory.mktemp("flow_dit") / "run"
    train(shapes_dir, tiny_vae_run, out, "--config", "dit-tiny", "--max-steps", "2", "objective=flow",
          "cond.type=class", "model.time_freq_shift=1", "train.checkpoint_every=2", "train.image_log_every=100",
          "sample.steps=1,4", f"cache_dir={out.parent / 'cache'}")
    return out


def test_train_unet_exports_carry_the_diffusers_dit_and_a_card(flow_dit_run):
    for folder in ("unet", "unet_ema"):
        theirs = diffusers.DiTTransformer2DModel.from_pretrained(flow_dit_run / folder / DIFFUSERS_FOLDER)
        assert theirs.config.num_embeds_ada_norm == 3
        card = card_of(flow_dit_run / folder)
        assert "2 optimizer steps" in card.text and "`flow`" in card.text
    assert (flow_dit_run / "frozen_vae" / DIFFUSERS_FOLDER / "config.json").is_file()
    # the card's diffusers code runs as written (its paths pointed at the run's folders)
    text = card_of(flow_dit_run / "unet_ema").text
    code = text.split("```python\n")[1].split("```")[0]
    code = code.replace("path/to/folder/diffusers", str(flow_dit_run / "unet_ema" / DIFFUSERS_FOLDER))
    code = code.replace("path/to/vae/diffusers", str(flow_dit_run / "frozen_vae" / DIFFUSERS_FOLDER))
    scope: dict = {}
    exec(code, scope)
    assert scope["images"].shape == (4, 3, 32, 32) and torch.isfinite(scope["images"]).all()


def test_publish_uploads_the_export_its_vae_and_card_in_one_commit(flow_dit_run, hub, tmp_path):
    publish.main(["--model", str(flow_dit_run), "--repo", "user/dit", "--private", "--license", "mit",
                  "--out", str(tmp_path / "kept")])
    (create, repo, options), (upload, upload_options) = hub.calls
    assert create == "create_repo" and repo == "user/dit"
    assert options == {"private": True, "repo_type": "model", "exist_ok": True}
    assert upload == "upload_folder" and upload_options["repo_id"] == "user/dit"
    files = sorted(str(p.relative_to(hub.uploaded)) for p in hub.uploaded.rglob("*") if p.is_file())
    assert files == ["README.md", "config.json", "diffusers/config.json", "diffusers/diffusion_pytorch_model.safetensors",
                     "model.safetensors", "vae/README.md", "vae/config.json", "vae/diffusers/config.json",
                     "vae/diffusers/diffusion_pytorch_model.safetensors", "vae/model.safetensors"]
    assert (hub.uploaded / "model.safetensors").read_bytes() == \
        (flow_dit_run / "unet_ema" / "model.safetensors").read_bytes()
    card = card_of(hub.uploaded)
    assert card.data.license == "mit" and 'from_pretrained("user/dit", subfolder="diffusers")' in card.text
    assert "hf download user/dit --local-dir dit" in card.text
    # A download works as the card says: sample.py from the repository's folder, moved away from the run.
    downloaded = tmp_path / "elsewhere" / "dit"
    shutil.move(tmp_path / "kept", downloaded)
    for unet, vae, out in ((downloaded, downloaded / "vae", "a"), (flow_dit_run, None, "b")):
        sample.main(["--unet", str(unet), *(["--vae", str(vae)] if vae else []), "--out", str(tmp_path / out),
                     "--num-samples", "2", "--steps", "2", "--seed", "3"])
    for name in ("000000.png", "000001.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / name)), np.asarray(Image.open(tmp_path / "b" / name)))


def test_publish_puts_the_sweeps_scores_in_the_card_and_refuses_another_models(flow_dit_run, hub, tmp_path):
    digest = weights_digest(json.loads((flow_dit_run / "unet_ema" / "config.json").read_text()))
    sweep = tmp_path / "sweep"
    rows = {"steps_4_cfg_1": {"key": "k", "steps": 4, "cfg_scale": 1.0, "reference": "ref.npz", "num_samples": 2048,
                              "fid": 12.5, "inception_score": 3.25}}
    (sweep / "samples" / "steps_4_cfg_1").mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps(rows))
    (sweep / "samples" / "steps_4_cfg_1" / "request.json").write_text(json.dumps({"unet_weights": digest}))
    publish.main(["--model", str(flow_dit_run), "--out", str(tmp_path / "kept"), "--scores", str(sweep / "sweep.json")])
    card = card_of(tmp_path / "kept")
    assert card.data.metrics == ["fid", "inception_score"]
    assert "| 4 | 1 | 12.5 | 3.25 | 2048 |" in card.text and "`ref.npz`" in card.text
    assert hub.calls == []          # --out alone uploads nothing
    # a cell of another model (a post-hoc EMA length of the same sweep) is left out; none left is refused
    rows["ema_0.1_steps_4_cfg_1"] = {**rows["steps_4_cfg_1"], "ema_length": 0.1, "fid": 99.0}
    (sweep / "samples" / "ema_0.1_steps_4_cfg_1").mkdir()
    (sweep / "samples" / "ema_0.1_steps_4_cfg_1" / "request.json").write_text(json.dumps({"unet_weights": "xxh3:x"}))
    (sweep / "sweep.json").write_text(json.dumps(rows))
    publish.main(["--model", str(flow_dit_run), "--out", str(tmp_path / "kept3"), "--scores", str(sweep / "sweep.json")])
    text = card_of(tmp_path / "kept3").text
    assert "| 4 | 1 | 12.5 |" in text and "| 99 |" not in text and "ema_length" not in text
    (sweep / "samples" / "steps_4_cfg_1" / "request.json").write_text(json.dumps({"unet_weights": "xxh3:another"}))
    with pytest.raises(publish.PublishError, match="no cell was sampled from this export"):
        publish.main(["--model", str(flow_dit_run), "--out", str(tmp_path / "kept2"), "--scores",
                      str(sweep / "sweep.json")])


def test_an_export_made_before_cards_publishes_with_them(hub, tmp_path):
    """The f0126e0 fixture (a UNet and its VAE, no card, no diffusers copy): the VAE gets its diffusers copy and
    both their cards at publish time."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE / "unet_class", run)
    publish.main(["--model", str(run), "--out", str(tmp_path / "kept")])
    kept = tmp_path / "kept"
    assert "No diffusers copy: model.arch=unet" in card_of(kept).text
    vae = diffusers.AutoencoderKL.from_pretrained(kept / "vae" / DIFFUSERS_FOLDER)
    assert vae.config.scaling_factor == load_vae(FIXTURE / "vae").config.scale_factor
    assert not (run / "unet_ema" / "README.md").exists()        # the export itself is left as it was


@pytest.mark.parametrize("case, message", [
    ("no_target", "give --repo user/name to publish, or --out FOLDER"),
    ("bad_repo", "--repo not a/repo/name: not a Hub repository name"),
    ("hub_refuses", "the Hub refused user/dit: 401 Client Error"),
    ("damaged", "its checksum is not the one config.json recorded"),
    ("not_an_export", "neither a model folder"),
    ("another_vae", "is not the VAE"),
])
def test_publish_problems_are_one_line(case, message, flow_dit_run, hub, monkeypatch, tmp_path, capsys):
    model = flow_dit_run
    args = ["--repo", "user/dit"]
    if case == "no_target":
        args = []
    elif case == "bad_repo":
        args = ["--repo", "not a/repo/name"]
    elif case == "hub_refuses":
        monkeypatch.setattr(publish, "HfApi", lambda: FakeHub(fail=True))
    elif case == "damaged":
        model = tmp_path / "copy"
        shutil.copytree(flow_dit_run / "unet_ema", model)
        with open(model / "model.safetensors", "r+b") as f:
            f.seek(-4, 2)
            f.write(b"\0\0\0\1")
    elif case == "not_an_export":
        model = tmp_path
    elif case == "another_vae":
        save_vae(AutoencoderKL(load_vae(flow_dit_run / "frozen_vae").config), tmp_path / "other_vae")
        args += ["--vae", str(tmp_path / "other_vae")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(publish.main, ["--model", str(model), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert [c[0] for c in hub.calls] in ([], ["create_repo"])
