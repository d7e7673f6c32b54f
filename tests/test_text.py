"""Text prompts (cond.type=text): captions, the frozen CLIP text encoder, embeddings in the latent cache,
text-conditioned UNet and DiT, sample.py --prompt, and the bad inputs. The encoder is a tiny random
CLIPTextModel with a BPE vocabulary written here (scripts/tiny_clip.py); nothing is downloaded."""
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import network_of

import sample
import train_unet
from modules.config.cli import run_cli
from modules.config.io import load_config
from modules.config.schema import DataConfig, UNetRunConfig
from modules.core.generation import decode_latents
from modules.core.objectives.shortcut import ShortcutConfig, shortcut_targets
from modules.core.seeding import image_seed, initial_noise
from modules.data.dataset import build_dataset
from modules.data.image_io import to_uint8
from modules.data.latent_store import LatentStore
from modules.interop.clip import TextEncoder
from modules.interop.vae import load_vae
from modules.run.export import load_network, read_network_export
from scripts.shapes import SHAPES, read_caption, render_shape_batch, shape_captions
from scripts.tiny_clip import write_tiny_clip

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "sd")


def train(data, vae, out, clip, *extra, config="tiny"):
    train_unet.main(["--config", config, "--data", str(data), "--vae", str(vae), "--output-dir", str(out),
                     "--report-to", "none", "cond.type=text", f"cond.text_encoder={clip}", *extra])


@pytest.fixture(scope="module")
def text_run(shapes_dir, tiny_vae_run, clip_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("text_run") / "unet"
    train(shapes_dir, tiny_vae_run, out, clip_dir, "--max-steps", "4", "train.checkpoint_every=4",
          "train.image_log_every=4", f"cache_dir={out.parent / 'cache'}")
    return out


def reference_embeddings(clip: Path, prompts: list[str]) -> torch.Tensor:
    """Stable Diffusion's prompt encoding written out with transformers: pad to 16 tokens, last hidden state."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(clip / "tokenizer"))
    model = transformers.CLIPTextModel.from_pretrained(str(clip / "text_encoder"))
    ids = tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).last_hidden_state


# ----------------------------------------------------------------------------- captions of the example data

def test_example_images_are_unchanged_and_their_captions_read_back():
    # SHA-256 of render_shape_batch(12, 32, seed=3) before captions existed: the random draws did not move.
    expected = {"textured": "4c98049827bc545c5cfdb0c06a60be239e43dda481d0ce0b84d9db672f3e47a6",
                "plain": "2697046eda33a266e807bf9a22ddfe20354bd396c7bba965bbb47116319c876a"}
    for background, digest in expected.items():
        images, masks, _ = render_shape_batch(12, 32, seed=3, background=background)
        assert hashlib.sha256(images.tobytes() + masks.tobytes()).hexdigest() == digest
    images, _, labels = render_shape_batch(300, 32, seed=9)
    captions = shape_captions(300, 32, seed=9)
    assert all(c.split()[2] == SHAPES[label] for c, label in zip(captions, labels))
    assert {c.split()[-2] for c in captions} == {"cloudy", "striped"}
    assert len({c.split()[1] for c in captions}) == 6
    # The analysers read colour and shape back from clean 32 px images (one of 600 at seed 7 is misread).
    read = [read_caption(image) for image in images]
    assert [r[0] for r in read] == [c.split()[1] for c in captions]
    assert np.mean([r[1] == c.split()[2] for r, c in zip(read, captions)]) >= 0.99


def test_metadata_captions_and_the_fingerprint(shapes_dir, tmp_path, caplog):
    rows = [json.loads(line) for line in (shapes_dir / "metadata.jsonl").read_text().splitlines()]
    assert rows[0]["text"] == shape_captions(1, 32, seed=0)[0]
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    cfg = DataConfig(path=str(data), image_size=32)
    with_text = build_dataset(cfg, "text")
    assert with_text[5]["caption"] == rows[5]["text"] and "caption" not in build_dataset(cfg)[5]
    # metadata.csv: an edited caption changes the fingerprint; a missing one is named.
    (data / "metadata.jsonl").unlink()
    lines = ["file_name,text"] + [f"{r['file_name']},{r['text']}" for r in rows]
    (data / "metadata.csv").write_text("\n".join(lines) + "\n")
    before = build_dataset(cfg, "text").fingerprint()
    (data / "metadata.csv").write_text("\n".join(lines[:3] + [lines[3].replace(" on ", " under ")] + lines[4:]))
    assert build_dataset(cfg, "text").fingerprint() != before
    (data / "metadata.csv").write_text("\n".join(lines[:3] + [rows[2]["file_name"] + ","] + lines[4:]))
    with pytest.raises(Exception, match=f"image .*{rows[2]['file_name']} has no caption"):
        build_dataset(cfg, "text")
    caplog.set_level(logging.WARNING)
    assert build_dataset(cfg, "text", allow_empty_caption=True)[2]["caption"] == ""
    assert "1 image(s) without a caption" in caplog.text
    (data / "metadata.csv").unlink()
    (data / "metadata.jsonl").write_text("".join(json.dumps({**r, "text": 5 if i == 1 else r["text"]}) + "\n"
                                                 for i, r in enumerate(rows)))
    with pytest.raises(Exception, match=f"caption \\('text'\\) of .*{rows[1]['file_name']} must be text, got 5"):
        build_dataset(cfg, "text")


def test_captions_from_a_saved_dataset_column(tmp_path):
    import datasets
    images, _, _ = render_shape_batch(4, 16, seed=1)
    table = datasets.Dataset.from_dict({"image": [Image.fromarray(i) for i in images],
                                        "caption": ["a red circle", "a blue square", "a green triangle", "a"]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "caption": datasets.Value("string")}))
    table.save_to_disk(str(tmp_path / "saved"))
    dataset = build_dataset(DataConfig(path=str(tmp_path / "saved"), image_size=16), "caption")
    assert [dataset[i]["caption"] for i in range(4)] == ["a red circle", "a blue square", "a green triangle", "a"]
    with pytest.raises(Exception, match="no 'text' column"):
        build_dataset(DataConfig(path=str(tmp_path / "saved"), image_size=16), "text")


# ----------------------------------------------------------------------------- the encoder

def test_encoder_layouts_layers_and_the_sd2_cut(clip_dir, tmp_path):
    prompts = ["a red square on a striped background", ""]
    sd = TextEncoder(str(clip_dir))
    single = TextEncoder(str(write_tiny_clip(tmp_path / "single", layout="single")))
    assert (sd.tokens, sd.width) == (16, 32) and sd.identity == single.identity
    torch.testing.assert_close(sd.encode(prompts), reference_embeddings(clip_dir, prompts))
    torch.testing.assert_close(single.encode(prompts), sd.encode(prompts))
    # penultimate == the last layer of the same encoder cut by one layer (how diffusers ships SD 2's)
    cut = tmp_path / "cut"
    shutil.copytree(clip_dir, cut)
    model = transformers.CLIPTextModel.from_pretrained(str(clip_dir / "text_encoder"))
    model.encoder.layers = model.encoder.layers[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(str(cut / "text_encoder"))
    penultimate = TextEncoder(str(clip_dir), "penultimate").encode(prompts)
    torch.testing.assert_close(penultimate, TextEncoder(str(cut)).encode(prompts))
    assert not torch.allclose(penultimate, sd.encode(prompts))


def test_embeddings_are_cached_once_and_reused(shapes_dir, tiny_vae_run, clip_dir, tmp_path, monkeypatch, caplog):
    calls = []
    real_encode = TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode", lambda self, prompts: calls.append(len(prompts)) or
                        real_encode(self, prompts))
    caplog.set_level(logging.INFO)
    common = ["--max-steps", "1", "train.checkpoint_every=1", "train.image_log_every=100", f"cache_dir={tmp_path}/c"]
    train(shapes_dir, tiny_vae_run, tmp_path / "a", clip_dir, *common)
    assert calls and "encoding latent store" in caplog.text
    calls.clear()
    caplog.clear()
    train(shapes_dir, tiny_vae_run, tmp_path / "b", clip_dir, *common)
    assert calls == [] and "using latent store" in caplog.text
    cache = LatentStore(next((tmp_path / "c").glob("store_*")), hflip=True)
    captions = [json.loads(line)["text"] for line in (shapes_dir / "metadata.jsonl").read_text().splitlines()]
    cached = torch.stack([cache[i]["text"] for i in range(len(cache))])
    expected = reference_embeddings(clip_dir, captions)
    torch.testing.assert_close(cached, expected.half().float())     # stored as float16
    torch.testing.assert_close(cache.null_text, reference_embeddings(clip_dir, [""])[0].half().float())
    # The export keeps the empty prompt's embedding as the null condition, and records the encoder.
    unet = load_network(tmp_path / "b" / "unet_ema")
    torch.testing.assert_close(unet.conditioner.null_text, cache.null_text)
    record = read_network_export(tmp_path / "b" / "unet_ema").text_encoder
    assert record["identity"] == TextEncoder(str(clip_dir)).identity and record["tokens"] == 16


def test_a_changed_caption_or_encoder_gets_fresh_embeddings(shapes_dir, tiny_vae_run, clip_dir, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    common = ["--max-steps", "1", "train.checkpoint_every=1", "train.image_log_every=100", f"cache_dir={tmp_path}/c"]
    train(data, tiny_vae_run, tmp_path / "a", clip_dir, *common)
    caplog.set_level(logging.INFO)
    text = (data / "metadata.jsonl").read_text()
    (data / "metadata.jsonl").write_text(text.replace("cloudy", "striped", 1))
    train(data, tiny_vae_run, tmp_path / "b", clip_dir, *common)
    assert "encoding latent store" in caplog.text
    caplog.clear()
    other = write_tiny_clip(tmp_path / "other_clip", seed=1)
    train(data, tiny_vae_run, tmp_path / "c_run", other, *common)     # (c is the store root: not a run folder)
    assert "encoding latent store" in caplog.text
    caplog.clear()
    train(data, tiny_vae_run, tmp_path / "d", clip_dir, *common, "cond.text_layer=penultimate")
    assert "encoding latent store" in caplog.text
    assert len(list((tmp_path / "c").glob("store_*"))) == 4


# ----------------------------------------------------------------------------- networks and objectives

def text_network(arch: str = "unet", mode: str = "crossattn", seed: int = 0):
    extra = ["model.arch=dit", "model.hidden_size=32", "model.depth=2", "model.num_heads=2"] if arch == "dit" else []
    cfg = load_config(UNetRunConfig, "unet", "tiny", ["cond.type=text", "cond.text_encoder=x",
                                                      f"cond.text_mode={mode}", *extra])
    torch.manual_seed(seed)
    net = network_of(cfg, text_tokens=16, text_width=32).eval()
    with torch.no_grad():           # away from the zero-initialised start, so every input matters
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        net.conditioner.null_text.copy_(torch.randn(16, 32))
    return net


@pytest.mark.parametrize("arch,mode", [("unet", "crossattn"), ("unet", "pooled"), ("dit", "crossattn"),
                                       ("dit", "pooled")])
def test_dropout_gives_the_empty_prompt_embedding(arch, mode):
    net = text_network(arch, mode)
    x, t, level = torch.randn(3, 4, 16, 16), torch.rand(3), torch.tensor([0, 1, 3])
    tokens = torch.randn(3, 16, 32)
    null = net.conditioner.null_text.expand(3, -1, -1)
    with torch.no_grad():
        dropped = net(x, t, level, cond=tokens, drop=torch.tensor([True, False, True]))
        assert torch.equal(dropped[[0, 2]], net(x, t, level, cond=null)[[0, 2]])
        assert torch.equal(dropped[1], net(x, t, level, cond=tokens)[1])
        assert torch.equal(net(x, t, level, cond=None), net(x, t, level, cond=null))
        assert not torch.allclose(net(x, t, level, cond=tokens), net(x, t, level, cond=null))


def test_bootstrap_cfg_teacher_guides_against_the_empty_prompt():
    net = text_network()
    w, x1, tokens = 1.5, torch.randn(16, 4, 16, 16), torch.randn(16, 16, 32)
    cfg = ShortcutConfig(denoise_timesteps=8, bootstrap_fraction=0.5, bootstrap_cfg=True, cfg_scale=w)
    with torch.no_grad():
        b = shortcut_targets(net, x1, tokens, cfg, generator=torch.Generator().manual_seed(0))
        rows = b.is_bootstrap.nonzero().flatten()
        level, t = b.level[rows] + 1, b.t[rows]
        guided = (b.level[rows] == cfg.num_levels - 1).view(-1, 1, 1, 1)

        def v(x, at):
            cond = net(x, at, level, cond=tokens[rows])
            return torch.where(guided, net(x, at, level, cond=None) + w * (cond - net(x, at, level, cond=None)), cond)
        half = (2.0 ** -b.level[rows].float() / 2).view(-1, 1, 1, 1)
        v1 = v(b.x_t[rows], t)
        v2 = v(torch.clamp(b.x_t[rows] + half * v1, -4, 4), t + half.flatten())
        expected = torch.clamp((v1 + v2) / 2, -4, 4)
    assert guided.any() and not guided.all()
    torch.testing.assert_close(b.target[rows], expected, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- sampling

def test_sample_prompts_equal_a_hand_written_guided_loop(text_run, clip_dir, tiny_vae_run, tmp_path):
    prompts = ["a red circle on a plain background", "a blue triangle on a striped background"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    unet = load_network(text_run / "unet_ema")
    vae = load_vae(tiny_vae_run / "vae").eval()
    embeddings = reference_embeddings(clip_dir, prompts).repeat_interleave(2, dim=0)
    for scale in (1.0, 2.0):
        out = tmp_path / f"w{scale}"
        sample.main(["--unet", str(text_run), "--out", str(out), "--prompts", str(tmp_path / "prompts.txt"),
                     "--num-samples", "2", "--steps", "2", "--cfg-scale", str(scale)])
        manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        assert [m["condition"] for m in manifest] == [prompts[0]] * 2 + [prompts[1]] * 2
        seeds = [image_seed(0, i) for i in range(4)]
        x = initial_noise(seeds, (4, 16, 16))
        level = torch.ones(4, dtype=torch.long)          # 2 steps: level log2 2
        with torch.no_grad():
            for i in range(2):
                t = torch.full((4,), i / 2)
                v = unet(x, t, level, cond=embeddings)    # scale 1: the conditional model alone
                if scale != 1.0:
                    v_null = unet(x, t, level, cond=None)
                    v = v_null + scale * (v - v_null)
                x = x + v / 2
        expected = to_uint8(decode_latents(vae, x, 4))
        for i, m in enumerate(manifest):
            got = np.asarray(Image.open(out / m["file"]), dtype=np.int16)
            assert np.abs(got - expected[i].astype(np.int16)).max() <= 1, (scale, i)


def test_text_model_separates_two_captions(tmp_path, tiny_vae_run, clip_dir):
    """Flat red and flat blue images captioned by colour: samples of each prompt land nearer to that
    caption's mean latent than to the other's, for at least 90% of samples (the class test's measure)."""
    rng = np.random.default_rng(0)
    rows = []
    (tmp_path / "data").mkdir()
    for name, colour in [("blue", (40, 60, 220)), ("red", (220, 50, 40))]:
        for i in range(16):
            pixels = np.clip(np.array(colour) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / f"{name}{i}.png")
            rows.append({"file_name": f"{name}{i}.png", "text": f"a {name} square on a plain background"})
    (tmp_path / "data" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    train(tmp_path / "data", tiny_vae_run, out, clip_dir, "--max-steps", "150", "ema.decay=0.9",
          "train.checkpoint_every=1000", "train.image_log_every=1000", "train.log_every=50",
          f"cache_dir={tmp_path / 'cache'}")
    unet = load_network(out / "unet_ema")
    scale = read_network_export(out / "unet_ema").vae["model"]["scale_factor"]
    cached = LatentStore(next((tmp_path / "cache").glob("store_*")), hflip=False)
    is_red = torch.tensor(["red" in cached.caption(i) for i in range(len(cached))])
    means = torch.stack([cached[i]["mean"] for i in range(len(cached))]) * scale
    caption_means = torch.stack([means[~is_red].mean(0), means[is_red].mean(0)])
    n = 16
    target = torch.tensor([0] * n + [1] * n)
    tokens = reference_embeddings(clip_dir, ["a blue square on a plain background",
                                             "a red square on a plain background"])[target]
    x = initial_noise(range(2 * n), (4, 16, 16))
    with torch.no_grad():
        for i in range(8):
            x = x + unet(x, torch.full((2 * n,), i / 8), torch.full((2 * n,), 3), cond=tokens) / 8
    distance = ((x[:, None] - caption_means[None]) ** 2).flatten(2).mean(-1)
    accuracy = (distance.argmin(1) == target).float().mean().item()
    assert accuracy >= 0.9, accuracy


@pytest.mark.parametrize("mode", ["crossattn", "pooled"])
def test_dit_trains_with_text_and_reloads(mode, shapes_dir, tiny_vae_run, clip_dir, tmp_path):
    out = tmp_path / "dit"
    train(shapes_dir, tiny_vae_run, out, clip_dir, "--max-steps", "3", "train.checkpoint_every=3",
          "train.image_log_every=3", f"cond.text_mode={mode}", f"cache_dir={tmp_path / 'cache'}", config="dit-tiny")
    dit = load_network(out / "unet")
    assert type(dit).__name__ == "DiT" and dit.conditioner.provides_context == (mode == "crossattn")
    tokens = reference_embeddings(clip_dir, ["a red circle on a plain background", "a blue square on a plain "
                                             "background"])
    x, t, level = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.6]), torch.tensor([3, 1])
    with torch.no_grad():   # three steps moved the zero-initialised text paths: the prompt now matters
        assert not torch.allclose(dit(x, t, level, cond=tokens), dit(x, t, level, cond=None))
        assert torch.equal(dit(x, t, level, cond=tokens, drop=torch.tensor([True, True])),
                           dit(x, t, level, cond=None))


# ----------------------------------------------------------------------------- bad input

def one_line_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as info:
        run_cli(main, [*map(str, argv)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    return errors[0]


@pytest.mark.parametrize("case", ["missing", "not_clip", "unreadable", "vocab_mismatch", "pickle_only",
                                  "no_caption"])
def test_bad_text_input_is_one_line_before_training(case, shapes_dir, tiny_vae_run, clip_dir, tmp_path, capsys):
    clip, data = tmp_path / "clip", shapes_dir
    if case != "missing":
        shutil.copytree(clip_dir, clip)
    if case == "not_clip":
        shutil.rmtree(clip / "tokenizer")
    if case == "unreadable":
        (clip / "text_encoder" / "config.json").write_text("{not json")
    if case == "vocab_mismatch":
        vocab = json.loads((clip / "tokenizer" / "vocab.json").read_text())
        vocab.update({f"extra{i}</w>": len(vocab) + i for i in range(5)})
        (clip / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    if case == "pickle_only":       # its unpickling would create the marker file
        from test_reliability import Payload
        weights = clip / "text_encoder" / "model.safetensors"
        torch.save({"x": Payload(tmp_path / "unpickled")}, weights.with_name("pytorch_model.bin"))
        weights.unlink()
    if case == "no_caption":
        data = tmp_path / "data"
        shutil.copytree(shapes_dir, data)
        rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
        del rows[4]["text"]
        (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = {"missing": "no such folder", "not_clip": "holds neither text_encoder/ + tokenizer/",
               "unreadable": "cannot read the CLIP config or tokenizer",
               "vocab_mismatch": "they do not belong together", "pickle_only": ".safetensors files only", "no_caption": "has no caption"}[case]
    line = one_line_error(capsys, train_unet.main, [
        "--config", "tiny", "--data", data, "--vae", tiny_vae_run, "--output-dir", tmp_path / "run",
        "--report-to", "none", "--max-steps", "1", "cond.type=text", f"cond.text_encoder={clip}",
        f"cache_dir={tmp_path / 'cache'}"])
    assert message in line
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "unpickled").exists()


def test_resume_with_another_text_encoder_is_refused(shapes_dir, tiny_vae_run, tmp_path, capsys):
    clip = write_tiny_clip(tmp_path / "clip")
    argv = ["--config", "tiny", "--data", shapes_dir, "--vae", tiny_vae_run, "--output-dir", tmp_path / "run",
            "--report-to", "none", "--max-steps", "1", "train.checkpoint_every=1", "train.image_log_every=100",
            "cond.type=text", f"cond.text_encoder={clip}", f"cache_dir={tmp_path / 'cache'}"]
    train_unet.main([*map(str, argv)])
    shutil.rmtree(clip)
    write_tiny_clip(clip, seed=1)               # other weights at the same path
    line = one_line_error(capsys, train_unet.main, [*argv, "--resume", "latest", "--max-steps", "2"])
    assert "trained with another text encoder" in line


def test_text_without_an_encoder_is_refused_naming_the_key():
    from modules.errors import ConfigError
    with pytest.raises(ConfigError, match="config key 'cond.text_encoder': cond.type=text needs a local CLIP text "
                                          "encoder folder"):
        load_config(UNetRunConfig, "unet", "tiny", ["cond.type=text"])


def test_over_long_captions_are_truncated_with_one_counted_warning(shapes_dir, tiny_vae_run, clip_dir, tmp_path,
                                                                    caplog):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for r in rows[:3]:
        r["text"] = " ".join([r["text"]] * 3)         # 3 x 7 words + start and end: 23 tokens, the context is 16
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    caplog.set_level(logging.WARNING)
    train(data, tiny_vae_run, tmp_path / "run", clip_dir, "--max-steps", "1", "train.checkpoint_every=1",
          "train.image_log_every=100", f"cache_dir={tmp_path / 'cache'}")
    warnings = [r.getMessage() for r in caplog.records if "longer than the text encoder" in r.getMessage()]
    assert warnings == ["3 caption(s) of the data are longer than the text encoder's 16 tokens: truncated "
                        "(as Stable Diffusion does)"]


def test_sample_refusals_for_prompts(text_run, tiny_unet_run, clip_dir, tmp_path, capsys):
    assert "not text-conditioned" in one_line_error(capsys, sample.main, [
        "--unet", tiny_unet_run, "--out", tmp_path / "a", "--prompt", "a red circle"])
    assert "pass --prompt TEXT or --prompts FILE" in one_line_error(capsys, sample.main, [
        "--unet", text_run, "--out", tmp_path / "b"])
    (tmp_path / "empty.txt").write_text("\n \n")
    assert "no prompt in the file" in one_line_error(capsys, sample.main, [
        "--unet", text_run, "--out", tmp_path / "c", "--prompts", tmp_path / "empty.txt"])
    other = write_tiny_clip(tmp_path / "other", seed=1)
    assert "is not the one" in one_line_error(capsys, sample.main, [
        "--unet", text_run, "--out", tmp_path / "d", "--prompt", "a red circle", "--text-encoder", other])
    assert "does not exist; pass --text-encoder" in one_line_error(capsys, sample.main, [
        "--unet", text_run, "--out", tmp_path / "d", "--prompt", "a red circle", "--text-encoder", tmp_path / "gone"])


def test_two_processes_encode_their_shares_into_the_same_cache(shapes_dir, tiny_vae_run, clip_dir, tmp_path):
    """Under accelerate launch each process encodes its share of the captions; the merged cache holds
    every caption's embedding in data order, as one process computes it."""
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml",
         "train_unet.py", "--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run),
         "--output-dir", str(tmp_path / "ddp"), "--report-to", "none", "--max-steps", "2", "cond.type=text",
         f"cond.text_encoder={clip_dir}", "train.batch_size=4", "train.checkpoint_every=2",
         "train.image_log_every=100", f"cache_dir={tmp_path / 'cache'}"],
        cwd=root, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), distributed type MULTI_CPU" in result.stderr
    cache = LatentStore(next((tmp_path / "cache").glob("store_*")), hflip=True)
    captions = [json.loads(line)["text"] for line in (shapes_dir / "metadata.jsonl").read_text().splitlines()]
    assert [cache.caption(i) for i in range(len(cache))] == captions
    expected = reference_embeddings(clip_dir, captions).half().float()
    assert torch.equal(torch.stack([cache[i]["text"] for i in range(len(cache))]), expected)
