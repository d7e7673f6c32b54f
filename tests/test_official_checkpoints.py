"""The papers' checkpoints start a run (``init_from``): state dicts in the official DiT layout (DiT, SiT, REPA, the
MeanFlow PyTorch code), pickled (read with weights_only) or safetensors, against a transcription of the official
DiT forward (facebookresearch/DiT models.py, timm's layers written out); and their refusals, one line each."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from support import network_of
from torch import nn

from modules.config.io import load_config
from modules.config.schema import UNetRunConfig
from modules.errors import ModelFolderError
from modules.interop.dit import load_init_weights

HIDDEN, HEADS, DEPTH, PATCH, CHANNELS, CLASSES = 64, 4, 2, 2, 4, 3


# ----------------------------------------------------------------------------- the official code, transcribed

def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.
    omega = 1. / 10000 ** omega
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Embedder(nn.Module):      # TimestepEmbedder
    def __init__(self, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, 256))


class Attention(nn.Module):     # timm's, unfused
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, 4 * hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, PATCH * PATCH * out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class OfficialDiT(nn.Module):
    """DiT (learn_sigma: 2C outputs, SiT too), REPA's SiT (C outputs, projectors) or the MeanFlow code's SiT
    (r_embedder of t - r), on a ``grid`` x ``grid`` token grid."""

    def __init__(self, grid, learn_sigma=True, meanflow=False, repa=False, hidden=HIDDEN, heads=HEADS):
        super().__init__()
        self.out_channels = 2 * CHANNELS if learn_sigma else CHANNELS

        class PatchEmbed(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Conv2d(CHANNELS, hidden, PATCH, stride=PATCH)

            def forward(self, x):
                return self.proj(x).flatten(2).transpose(1, 2)
        self.x_embedder = PatchEmbed()
        self.t_embedder = Embedder(hidden)
        if meanflow:
            self.r_embedder = Embedder(hidden)
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(CLASSES + 1, hidden)
        self.pos_embed = nn.Parameter(torch.from_numpy(get_2d_sincos_pos_embed(hidden, grid)).float().unsqueeze(0),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(DEPTH))
        self.final_layer = FinalLayer(hidden, self.out_channels)
        if repa:
            self.projectors = nn.ModuleList([nn.Sequential(nn.Linear(hidden, 32), nn.SiLU(), nn.Linear(32, 32),
                                                           nn.SiLU(), nn.Linear(32, 8))])
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name != "pos_embed":
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel() + len(name)))

    def forward(self, x, t, y, r=None):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        if r is not None:
            c = c + self.r_embedder(t - r)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(shape=(x.shape[0], h, w, PATCH, PATCH, self.out_channels))
        x = torch.einsum('nhwpqc->nchpwq', x)
        return x.reshape(shape=(x.shape[0], self.out_channels, h * PATCH, h * PATCH))


# ----------------------------------------------------------------------------- ours from theirs

def ours_from(path, *overrides, num_classes=CLASSES):
    cfg = load_config(UNetRunConfig, "unet", "dit-tiny", ["objective=flow", "cond.type=class",
                                                          f"init_from={path}", *overrides])
    model = network_of(cfg, num_classes=num_classes)
    load_init_weights(model, cfg, model.sizes)
    return model.eval()


def inputs(size=4):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, CHANNELS, size, size, generator=gen)
    return x, torch.tensor([0.0, 0.25, 0.6, 0.999]), torch.tensor([0, 1, 2, CLASSES])    # the null label too


def close(ours, theirs):
    scale = theirs.abs().max()
    assert scale > 0.1 and (ours - theirs).abs().max() < 1e-5 * scale, (ours - theirs).abs().max() / scale


@pytest.mark.parametrize("kind", ["plain_dit", "training_checkpoint", "repa_safetensors"])
def test_an_official_checkpoint_starts_a_run_computing_the_official_function(kind, tmp_path):
    """Ours at t equals the official forward at the timestep 1000 t (DiT's timesteps), on the mean channels of a
    learned-sigma model; a training checkpoint gives its EMA weights."""
    theirs = OfficialDiT(grid=2, learn_sigma=kind != "repa_safetensors", repa=kind == "repa_safetensors")
    sd = theirs.state_dict()
    if kind == "plain_dit":
        path = tmp_path / "DiT-S-2.pt"
        torch.save(sd, path)
    elif kind == "training_checkpoint":
        online = OfficialDiT(grid=2)
        for p in online.parameters():
            p.data.mul_(0.5)
        path = tmp_path / "0400000.pt"
        torch.save({"model": online.state_dict(), "ema": sd, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                    "args": argparse.Namespace(model="DiT-S/2", lr=1e-4)}, path)
    else:
        path = tmp_path / "last.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    x, t, y = inputs()
    with torch.no_grad():
        close(ours_from(path)(x, t, cond=y), theirs(x, 1000 * t, y)[:, :CHANNELS])


def test_a_meanflow_checkpoint_brings_its_interval_embedder(tmp_path):
    """The MeanFlow code's r_embedder embeds t - r: ours' interval embedding, at the interval 1000 h."""
    theirs = OfficialDiT(grid=2, learn_sigma=False, meanflow=True)
    torch.save(theirs.state_dict(), tmp_path / "meanflow.pt")
    model = ours_from(tmp_path / "meanflow.pt", "objective=meanflow")
    x, _, y = inputs()
    # dyadic times: 1000 t - 1000 (t - h) is 1000 h exactly in float32
    t, h = torch.tensor([0.125, 0.25, 0.625, 0.875]), torch.tensor([0.125, 0.25, 0.5, 0.75])
    with torch.no_grad():
        close(model(x, t, interval=h, cond=y), theirs(x, 1000 * t, y, r=1000 * (t - h)))
    with pytest.raises(ModelFolderError, match=r"it embeds MeanFlow's interval \(r_embedder\), this run's network "
                                               r"has no such input \('level_emb.mlp"):
        ours_from(tmp_path / "meanflow.pt")


def test_another_grid_loads_with_a_warning(tmp_path, caplog):
    theirs = OfficialDiT(grid=4)
    torch.save(theirs.state_dict(), tmp_path / "DiT-S-2-512.pt")
    x, t, y = inputs(size=8)
    with torch.no_grad():
        ours = ours_from(tmp_path / "DiT-S-2-512.pt")(x, t, cond=y)     # 4 x 4 tokens made, 2 x 2 here: warned
    assert "was made for 4x4 tokens, this run has 2x2" in caplog.text
    assert ours.shape == (4, CHANNELS, 8, 8)


def refusal(tmp_path, sd, *overrides, name="bad.pt", **other) -> str:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    with pytest.raises(ModelFolderError) as info:
        ours_from(path, *overrides, **other)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_checkpoints_that_do_not_fit_are_one_line_naming_the_key(tmp_path):
    sd = OfficialDiT(grid=2).state_dict()
    qk_norm = {**sd, "blocks.0.attn.q_norm.weight": torch.ones(HIDDEN // HEADS)}     # REPA's qk_norm option
    assert "key 'blocks.0.attn.q_norm.weight' is not one of the DiT/SiT/REPA/MeanFlow layout's" in \
        refusal(tmp_path, qk_norm)
    assert "the checkpoint has 3 classes, this run 5 (the data's)" in refusal(tmp_path, sd, num_classes=5)
    assert "the checkpoint has model.depth=2, this run model.depth=3" in refusal(tmp_path, sd, "model.depth=3")
    moved = {**sd, "pos_embed": sd["pos_embed"].flip(1).contiguous()}
    assert "its 'pos_embed' is not the fixed 2-D sine-cosine code" in refusal(tmp_path, moved)
    no_blocks = {k: v for k, v in sd.items() if not k.startswith("blocks.0.mlp.fc1")}
    assert "no 'blocks.0.mlp.fc1.weight': not a whole DiT/SiT state dict" in refusal(tmp_path, no_blocks)
    broken = {**sd, "t_embedder.mlp.0.weight": torch.full_like(sd["t_embedder.mlp.0.weight"], float("nan"))}
    assert "hold NaN or infinite values, e.g. 't_embedder.mlp.0.weight'" in refusal(tmp_path, broken)
    args_only = {"args": argparse.Namespace(model="DiT-XL/2"), "steps": 3}
    assert "not a state dict of tensors (found ['args', 'steps']" in refusal(tmp_path, args_only)


def test_the_papers_widths_fix_the_head_count(tmp_path):
    """A state dict does not record heads: at the DiT paper's widths (S 384, B 768, L 1024, XL 1152) its head
    count is known, so DiT-S with 4 heads is refused instead of computing another function."""
    theirs = OfficialDiT(grid=2, hidden=384, heads=6)
    message = refusal(tmp_path, theirs.state_dict(), "model.hidden_size=384")
    assert "the checkpoint has model.num_heads=6, this run model.num_heads=4: set model.num_heads=6" in message
    x, t, y = inputs()
    torch.save(theirs.state_dict(), tmp_path / "s.pt")
    with torch.no_grad():
        close(ours_from(tmp_path / "s.pt", "model.hidden_size=384", "model.num_heads=6")(x, t, cond=y),
              theirs(x, 1000 * t, y)[:, :CHANNELS])
