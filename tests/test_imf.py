"""Improved MeanFlow (modules/core/objectives/imf.py) and its in-context DiT (modules/core/networks/icdit.py),
checked against the official code (github.com/Lyy-iiis/imeanflow at bf60cd7; cited as imf.py:LINE,
imfDiT.py:LINE): the loss and its gradient against a float64 line-by-line transcription of imf.py's loss
(below, REFERENCE), du/dt against a central difference, the draws' invariants, the samplers against a
transcription of imf.py's sample, the parameter counts against the official configs', and a run through
train_unet.py that trains, resumes, exports, loads and samples."""
from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from support import network_of, sizes_of
from torch.func import jvp

from modules.config.io import load_config
from modules.config.schema import UNetRunConfig
from modules.core.attention import forward_ad_attention
from modules.core.networks import build_network
from modules.core.networks.denoiser import count_parameters
from modules.core.networks.icdit import rotate, rope_tables
from modules.core.objectives import base as objectives_base
from modules.core.objectives.base import average_velocity_jvp
from modules.core.objectives.imf import Imf, ImfConfig, ImfDraws, guidance_scales
from modules.core.samplers import guided
from modules.errors import ConfigError

Net = Callable[..., torch.Tensor]
NUM_CLASSES = 3


# ================================================================================== REFERENCE
# A float64 transcription of the official iMF loss and sampler (imf.py at bf60cd7), in THEIR time: t = 1
# noise, t = 0 data, z_t = (1 - t) x + t e, v = e - x, r <= t. Nets are pure functions
# u_fn(z, t, h, w, t_min, t_max, y) (the u-head, imfDiT.py:359) and v_fn (the v-head, imfDiT.py:360); the
# official network returns both from one forward, which is the same for a deterministic network.

def _bc(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0], *([1] * (like.dim() - 1)))     # (B,) -> (B, 1, 1, 1) (imf.py:201-210)


def reference_cfg_scale(u: torch.Tensor, beta: float = 1.0, s_max: float = 7.0) -> torch.Tensor:
    """imf.py:141-161 at given uniforms u (the official draws u ~ U[0, 1) itself, imf.py:146-148)."""
    if beta == 1.0:
        return torch.exp(u * math.log1p(s_max))                 # imf.py:150-151
    log_base = (1.0 - beta) * math.log1p(s_max)                 # imf.py:156
    log_inner = torch.log1p(u * math.expm1(log_base))           # imf.py:157
    return torch.exp(log_inner / (1.0 - beta))                  # imf.py:159


def reference_imf_loss(u_fn: Net, v_fn: Net, x, e, t, r, w, t_min, t_max, y, drop_mask, null_label: int,
                       fm_mask, norm_eps: float = 0.01, norm_p: float = 1.0):
    """imf.py:331-401. Returns (loss, aux)."""
    b = x.shape[0]
    zeros, ones = torch.zeros(b, dtype=x.dtype), torch.ones(b, dtype=x.dtype)
    y_null = torch.full_like(y, null_label)
    tb = _bc(t, x)
    z_t = (1 - tb) * x + tb * e                                   # imf.py:350
    v_t = e - x                                                   # imf.py:351
    with torch.no_grad():   # guidance_fn (imf.py:295-325): only feeds stop-gradient'ed terms
        # v_fn (imf.py:235-261): [cond with raw w ; null with w = 1], via v_cond_fn (imf.py:212-233):
        # h = 0, t_min = 0, t_max = 1, the v-head output
        v_c_raw = v_fn(z_t, t, zeros, w, zeros, ones, y)          # imf.py:252-259
        v_u = v_fn(z_t, t, zeros, ones, zeros, ones, y_null)      # imf.py:253-256 (w = 1 for the null query)
        v_g_fm = v_t + _bc(1 - 1 / w, x) * (v_c_raw - v_u)        # imf.py:315
        w_eff = torch.where((t >= t_min) & (t <= t_max), w, ones)  # imf.py:317
        v_c = v_fn(z_t, t, zeros, w_eff, zeros, ones, y)          # imf.py:319 (original labels)
        v_g = v_t + _bc(1 - 1 / w_eff, x) * (v_c - v_u)           # imf.py:320
        v_g = torch.where(_bc(fm_mask, x), v_g_fm, v_g)           # imf.py:323
        labels = torch.where(drop_mask, y_null, y)                # cond_drop, imf.py:286-290
        v_g = torch.where(_bc(drop_mask, x), v_t, v_g)            # imf.py:291

    def u_of(z, t_, r_):                                          # imf.py:366-367 (raw w, sampled interval)
        return u_fn(z, t_, t_ - r_, w, t_min, t_max, labels)

    u, du_dt = jvp(u_of, (z_t, t, r), (v_c, torch.ones_like(t), torch.zeros_like(r)))   # imf.py:369-373
    v = v_fn(z_t, t, t - r, w, t_min, t_max, labels)              # the aux output of imf.py:373
    V = u + _bc(t - r, x) * du_dt.detach()                        # imf.py:376
    v_g = v_g.detach()                                            # imf.py:378

    def adp_wt(l):                                                # imf.py:380-382
        return l / ((l + norm_eps) ** norm_p).detach()

    dims = tuple(range(1, x.dim()))
    sq_u = ((V - v_g) ** 2).sum(dims)                             # imf.py:385
    sq_v = ((v - v_g) ** 2).sum(dims)                             # imf.py:389 (the same target)
    loss = (adp_wt(sq_u) + adp_wt(sq_v)).mean()                   # imf.py:386, 390, 392-393
    aux = {"loss_u": ((V - v_g) ** 2).mean().detach(),            # imf.py:397
           "loss_v": ((v - v_g) ** 2).mean().detach(),            # imf.py:398
           "sq_u": sq_u.detach(), "v_g": v_g, "du_dt": du_dt.detach()}
    return loss, aux


def reference_sample(u_fn: Net, z1, y, w: float, t_min: float, t_max: float, num_steps: int):
    """imf.py:42-48, 90-114: t_steps = linspace(1, 0, n + 1); z_r = z_t - (t - r) u(z_t, t, h = t - r, ...)."""
    b = z1.shape[0]
    steps = torch.linspace(1.0, 0.0, num_steps + 1, dtype=z1.dtype)
    full = lambda value: torch.full((b,), float(value), dtype=z1.dtype)  # noqa: E731
    z = z1
    for i in range(num_steps):
        t, r = full(steps[i]), full(steps[i + 1])
        z = z - _bc(t - r, z) * u_fn(z, t, t - r, full(w), full(t_min), full(t_max), y)
    return z


def theirs_from_ours(net_o: Net) -> Net:
    """Our head f(z, t, h, w, low, high, y) (velocity x1 - x0, interval in our time) as the paper's: t = 1 - t_o,
    v_p = -v_o, [t_min, t_max] = [1 - high, 1 - low]."""
    return lambda z, t_p, h, w, t_min, t_max, y: -net_o(z, 1 - t_p, h, w, 1 - t_max, 1 - t_min, y)


def reference_loss_ours(u_fn_o: Net, v_fn_o: Net, x1, x0, d: ImfDraws, y, **kw):
    """The reference on our draws: paper (t, r) = (1 - s, 1 - t), [t_min, t_max] = [1 - high, 1 - low]."""
    low, high = d.interval[:, 0], d.interval[:, 1]
    return reference_imf_loss(theirs_from_ours(u_fn_o), theirs_from_ours(v_fn_o), x=x1, e=x0, t=1 - d.t, r=1 - d.s,
                              w=d.guidance, t_min=1 - high, t_max=1 - low, y=y, drop_mask=d.drop,
                              null_label=NUM_CLASSES, fm_mask=d.s == d.t, **kw)
# ================================================================================== end of REFERENCE


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tiny(overrides=(), perturb=True, dtype=torch.float64):
    """The imf-tiny network (3 classes, 8x8 latents), weights moved off their zero initialisation."""
    cfg = load_config(UNetRunConfig, "unet", "imf-tiny", list(overrides))
    torch.manual_seed(0)
    net = network_of(cfg, num_classes=NUM_CLASSES, downsample=4).to(dtype)
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return cfg, net


def head(net, which):
    """Our-convention pure function f(z, t, h, w, low, high, y) of one head of ``net``."""
    return lambda z, t, h, w, low, high, y: net(z, t, interval=h, cond=y, guidance=w,
                                                guidance_interval=torch.stack([low, high], 1), head=which)


def fixed_draws(objective, b=8, seed=1):
    """The objective's own draws, in float64, with the first two rows dropped; rows with t inside and outside
    their interval both present."""
    d = objective.draw(b, True, gen(seed), torch.device("cpu"))
    d = ImfDraws(d.t.double(), d.s.double(), d.guidance.double(), d.interval.double(), torch.arange(b) < 2, d.equal)
    inside = (d.t >= d.interval[:, 0]) & (d.t <= d.interval[:, 1])
    assert inside[d.equal:].any() and not inside[d.equal:].all()
    return d


def data(b=8, seed=2):
    g = gen(seed)
    return (torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64),
            torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, NUM_CLASSES, (b,), generator=g))


def grads(net):
    out = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    return out


# ----------------------------------------------------------------------------- the loss against the reference

def test_loss_and_gradient_equal_the_official_transcription():
    """On fixed draws (dropped rows, rows inside and outside their guidance interval, s = t rows), in float64
    through the tiny in-context DiT: the loss, its logs and every parameter's gradient equal the transcription
    of imf.py's loss (three guidance forwards, v from the same forward as the JVP)."""
    cfg, net = tiny()
    objective = Imf(cfg.imf, cond_drop=0.1)
    d = fixed_draws(objective)
    x1, x0, y = data()
    loss, logs = objective.loss_of(net, x1, x0, y, d)
    loss.backward()
    ours = grads(net)
    with forward_ad_attention():
        ref, aux = reference_loss_ours(head(net, "u"), head(net, "v"), x1, x0, d, y)
    ref.backward()
    theirs = grads(net)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(logs["loss_u"], aux["loss_u"], rtol=1e-10, atol=0)
    torch.testing.assert_close(logs["loss_v"], aux["loss_v"], rtol=1e-10, atol=0)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-8, atol=1e-12, msg=name)
    assert any(g.abs().max() > 0 for n, g in ours.items() if n.startswith("v_blocks"))


def test_boundary_variant_is_the_transcription_with_v_as_u_at_h_zero():
    """imf.velocity_head=false (v = u(z, t, t)): the queries and the tangent take u at h = 0, and the loss is
    the transcription's first term with v_fn(h) := u_fn(0)."""
    cfg, net = tiny(["imf.velocity_head=false"])
    assert net.v_blocks is None and net.v_final is None
    objective = Imf(cfg.imf, cond_drop=0.1)
    d = fixed_draws(objective)
    x1, x0, y = data()
    loss, logs = objective.loss_of(net, x1, x0, y, d)
    u_fn = head(net, "u")
    at_zero = lambda z, t, h, *rest: u_fn(z, t, torch.zeros_like(h), *rest)  # noqa: E731
    with forward_ad_attention():
        _, aux = reference_loss_ours(u_fn, at_zero, x1, x0, d, y)
    sq = aux["sq_u"]
    torch.testing.assert_close(loss, (sq / (sq + 0.01)).mean(), rtol=1e-10, atol=0)
    assert set(logs) == {"loss_u"}


def test_du_dt_through_the_network_equals_a_central_difference():
    """The JVP of (z, t, s) -> u(z, h = s - t | w, interval, c) along (v_c, 1, 0) (the paper's (v_c, 1, 0) on
    (z, t, r), mirrored), with v from the same forward: against (u(z + e v, t + e, s) - u(z - e v, t - e, s)) / 2e."""
    _, net = tiny()
    g = gen(3)
    z, tangent = (torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t, s = torch.tensor([0.1, 0.4, 0.5], dtype=torch.float64), torch.tensor([0.1, 0.9, 0.6], dtype=torch.float64)
    inputs = dict(guidance=torch.tensor([1.0, 3.0, 7.5], dtype=torch.float64),
                  guidance_interval=torch.tensor([[0.0, 1.0], [0.2, 0.7], [0.4, 0.55]], dtype=torch.float64))
    cond, drop = torch.tensor([0, 2, 1]), torch.tensor([True, False, False])
    u, du_dt, v = average_velocity_jvp(net, z, t, s, tangent, cond, drop, has_aux=True, head="uv", **inputs)
    eps = 1e-6
    with torch.no_grad():
        ahead = net(z + eps * tangent, t + eps, interval=s - t - eps, cond=cond, drop=drop, **inputs)
        behind = net(z - eps * tangent, t - eps, interval=s - t + eps, cond=cond, drop=drop, **inputs)
        torch.testing.assert_close(du_dt, (ahead - behind) / (2 * eps), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(u, net(z, t, interval=s - t, cond=cond, drop=drop, **inputs), rtol=0, atol=1e-12)
        torch.testing.assert_close(v, net(z, t, interval=s - t, cond=cond, drop=drop, head="v", **inputs),
                                   rtol=0, atol=1e-12)


def test_the_forward_ad_path_of_ddp_and_fsdp1_gives_the_same_loss_and_gradients(monkeypatch):
    """Under DDP and FSDP1 the JVP runs through torch.autograd.forward_ad, where v comes out as an auxiliary
    output: forced onto a plain module, that path gives the torch.func path's loss and gradients."""
    cfg, net = tiny()
    objective = Imf(cfg.imf, cond_drop=0.1)
    d, (x1, x0, y) = fixed_draws(objective), data()
    loss, _ = objective.loss_of(net, x1, x0, y, d)
    loss.backward()
    plain = grads(net)
    monkeypatch.setattr(objectives_base, "_runs_forward_ad", lambda model: model)
    forward_ad, _ = objective.loss_of(net, x1, x0, y, d)
    forward_ad.backward()
    torch.testing.assert_close(forward_ad, loss, rtol=1e-12, atol=0)
    for name, g in grads(net).items():
        torch.testing.assert_close(g, plain[name], rtol=1e-9, atol=1e-12, msg=name)


def _engines_worker(rank, port):
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel

    from modules.core.networks.icdit import Block

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg, reference = tiny()
        objective = Imf(cfg.imf, cond_drop=0.1)
        d, (x1, x0, y) = fixed_draws(objective), data()     # the same on both ranks: DDP's mean is the plain gradient

        def run(model):
            loss, _ = objective.loss_of(model, x1, x0, y, d)
            loss.backward()
            return loss.detach()

        loss_ref = run(reference)
        grads_ref = grads(reference)

        def fresh():
            net = tiny(perturb=False)[1]
            net.load_state_dict(reference.state_dict())
            return net

        def fsdp2(net):
            for m in net.modules():
                if isinstance(m, Block):
                    fully_shard(m)
            return fully_shard(net)

        engines = {
            "ddp": lambda: DistributedDataParallel(fresh()),
            "fsdp1": lambda: FullyShardedDataParallel(fresh(), device_id=torch.device("cpu"), use_orig_params=True,
                                                      auto_wrap_policy=ModuleWrapPolicy({Block})),
            "fsdp2": lambda: fsdp2(fresh()),
            "compiled ddp": lambda: torch.compile(DistributedDataParallel(fresh()), backend="aot_eager"),
        }
        for name, build in engines.items():
            model = build()
            for _ in range(2):      # DDP rebuilds its buckets at the second forward
                model.zero_grad()
                loss = run(model)
            torch.testing.assert_close(loss, loss_ref, rtol=1e-10, atol=0, msg=lambda m: f"{name}: loss {m}")
            if name == "fsdp1":
                with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
                    got = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}
            else:
                got = {n.replace("_orig_mod.", "").replace("module.", "", 1) if "ddp" in name
                       else n: p.grad.full_tensor() if name == "fsdp2" else p.grad for n, p in model.named_parameters()}
            assert got.keys() == grads_ref.keys(), name
            for n, grad in got.items():
                torch.testing.assert_close(grad, grads_ref[n], rtol=1e-8, atol=1e-10,
                                           msg=lambda m: f"{name}: gradient of {n} {m}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)     # as in tests/test_ema.py: no interpreter teardown under gloo's threads


def test_the_loss_and_its_gradients_are_the_same_through_ddp_fsdp_and_compile():
    """The iMF loss (JVP with v as an auxiliary output, the guidance queries skipping the u blocks) and its
    gradients equal the plain module's (float64) through DDP and FSDP1 (forward_ad), FSDP2 (torch.func) and
    compiled DDP on two CPU ranks."""
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_engines_worker, args=(port,), nprocs=2)


# ----------------------------------------------------------------------------- the draws

def ks_distance(samples: torch.Tensor, cdf: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Kolmogorov-Smirnov statistic sup |F_n - F| of ``samples`` against ``cdf``."""
    x = samples.double().sort().values
    n = x.numel()
    f = cdf(x)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    below = f - torch.arange(n, dtype=torch.float64) / n
    return max(above.max().item(), below.max().item())


def test_draws_have_the_official_invariants():
    """floor(B / 2) first rows s = t, the others s > t, logit(t), logit(s) ~ N(0.4, 1) (the paper's N(-0.4, 1)
    over 1 - time); log w / log 8 uniform (KS distance below the 0.1% critical value 1.95 / sqrt(n)); the
    interval [0, 1] on s = t rows, low ~ U[0, 0.5] and high ~ U[0.5, 1] elsewhere; the dropped rows the
    first ones, about 10%."""
    n = 40001
    d = Imf(ImfConfig(), cond_drop=0.1).draw(n, True, gen(4), torch.device("cpu"))
    assert d.equal == 20000 == int(n * 0.5)
    assert torch.equal(d.t[:d.equal], d.s[:d.equal]) and (d.s[d.equal:] > d.t[d.equal:]).all()
    logits = torch.logit(torch.cat([d.t[d.equal:], d.s[d.equal:]]).double())
    assert abs(logits.mean().item() - 0.4) < 0.03 and abs(logits.std().item() - 1.0) < 0.03
    critical = 1.95 / math.sqrt(n)
    assert d.guidance.min() >= 1 and d.guidance.max() < 8
    assert ks_distance(torch.log(d.guidance.double()) / math.log(8), lambda x: x.clamp(0, 1)) < critical
    assert torch.equal(d.interval[:d.equal], torch.tensor([[0.0, 1.0]]).expand(d.equal, 2))
    low, high = d.interval[d.equal:, 0], d.interval[d.equal:, 1]
    assert low.min() >= 0 and low.max() <= 0.5 and high.min() >= 0.5 and high.max() <= 1
    assert ks_distance(low / 0.5, lambda x: x.clamp(0, 1)) < critical
    assert ks_distance((high - 0.5) / 0.5, lambda x: x.clamp(0, 1)) < critical
    dropped = int(d.drop.sum())
    assert torch.equal(d.drop, torch.arange(n) < dropped) and abs(dropped / n - 0.1) < 0.006
    # Small batches: floor (7 rows: 3 with s = t, where MeanFlow's round gives 4), and the dropped rows are
    # s = t rows whenever there are no more of them than s = t rows.
    assert Imf(ImfConfig(), cond_drop=0.1).draw(7, True, gen(5), torch.device("cpu")).equal == 3
    for seed in range(100):
        d = Imf(ImfConfig(), cond_drop=0.3).draw(8, True, gen(seed), torch.device("cpu"))
        dropped = int(d.drop.sum())
        assert torch.equal(d.drop, torch.arange(8) < dropped)
        if dropped <= d.equal:
            assert torch.equal(d.s[d.drop], d.t[d.drop])
    unconditional = Imf(ImfConfig(), cond_drop=0.1).draw(8, False, gen(6), torch.device("cpu"))
    assert unconditional.drop is None and (unconditional.guidance == 1).all()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 2.0])
def test_guidance_scales_are_the_official_inverse_cdf(beta):
    """Our inverse CDF of p(w) ~ w^-beta on [1, 8] at the same uniforms equals imf.py:150-159; drawn, it has
    the distribution's CDF (1 - w^(1-beta)) / (1 - 8^(1-beta)) (log w / log 8 for beta = 1)."""
    u = torch.rand(20000, generator=gen(7), dtype=torch.float64)
    torch.testing.assert_close(guidance_scales(u, 1.0, 8.0, beta), reference_cfg_scale(u, beta), rtol=1e-12, atol=0)
    cfg = ImfConfig(guidance_beta=beta)
    w = Imf(cfg, cond_drop=0.1).draw(20000, True, gen(8), torch.device("cpu")).guidance.double()
    cdf = ((lambda x: torch.log(x) / math.log(8)) if beta == 1 else
           (lambda x: (1 - x ** (1 - beta)) / (1 - 8 ** (1 - beta))))
    assert ks_distance(w, cdf) < 1.95 / math.sqrt(20000)


def test_targets_are_guided_inside_the_interval_only_and_not_on_dropped_rows():
    """v_g = v + (1 - 1/w)(v_c - v_u) on rows with their condition and t in [low, high] (bounds included);
    v on dropped rows and outside; the queries are one doubled forward of the v-head at h = 0, interval
    [0, 1], conditional at w (1 outside the interval), null at w = 1."""
    calls = []

    def model(x, t, interval=None, cond=None, drop=None, guidance=None, guidance_interval=None, head="u"):
        calls.append(dict(interval=interval, drop=drop, guidance=guidance, guidance_interval=guidance_interval,
                          head=head, cond=cond))
        return torch.where(drop.view(-1, 1, 1, 1), -1.0, 3.0).expand_as(x)       # v_u = -1, v_c = 3

    objective = Imf(ImfConfig(), cond_drop=0.1)
    t = torch.tensor([0.3, 0.2, 0.3, 0.6, 0.9, 0.5])
    d = ImfDraws(t, t + 0.05, torch.full((6,), 4.0), torch.tensor([[0.0, 1.0]] * 2 + [[0.3, 0.6]] * 4),
                 torch.tensor([True, False, False, False, False, False]), 2)
    v = torch.randn(6, 4, 2, 2, generator=gen(9))
    v_g, v_c = objective.guided_target(model, torch.zeros_like(v), v, torch.arange(6), d)
    inside = torch.tensor([False, True, True, True, False, True])     # row 0 dropped, row 4 outside
    torch.testing.assert_close(v_g[inside], v[inside] + 0.75 * (3.0 - (-1.0)))
    torch.testing.assert_close(v_g[~inside], v[~inside])
    assert torch.equal(v_c, torch.full_like(v, 3.0))
    (call,) = calls
    assert call["head"] == "v" and torch.equal(call["interval"], torch.zeros(12))
    assert torch.equal(call["drop"], torch.arange(12) >= 6) and torch.equal(call["cond"][:6], torch.arange(6))
    assert call["guidance"].tolist() == [4.0, 4.0, 4.0, 4.0, 1.0, 4.0] + [1.0] * 6
    assert torch.equal(call["guidance_interval"], torch.tensor([[0.0, 1.0]]).expand(12, 2))
    # Without a condition (a direct call; run configs refuse cond.type=none): one query at w = 1, target v.
    calls.clear()
    unconditional = objective.draw(6, False, gen(13), torch.device("cpu"))
    v_g, _ = objective.guided_target(lambda x, t, drop=None, **kw: model(x, t, drop=torch.zeros(6, dtype=torch.bool),
                                                                           **kw), torch.zeros_like(v), v, None,
                                     unconditional)
    assert torch.equal(v_g, v) and calls[0]["guidance"].tolist() == [1.0] * 6 and calls[0]["cond"] is None


# ----------------------------------------------------------------------------- the network

@pytest.mark.parametrize("preset, training, inference", [
    ("imf-b2", 145_596_960, 88_948_256),
    ("imf-xl2", 711_113_760, 610_433_056),
])
def test_parameter_counts_are_the_official_configs(preset, training, inference):
    """Built on the meta device for ImageNet 256 (1000 classes, 32x32x4 latents): the official imfDiT's count
    (imfDiT.py:393-427; 89M at inference, the v blocks left out as its eval mode does, 146M in training for
    B/2), and without the velocity head the inference count less the v-head's final layer."""
    cfg = load_config(UNetRunConfig, "unet", preset)
    with torch.device("meta"):
        net = build_network(cfg.model, cfg.cond, sizes_of(cfg, num_classes=1000))
        assert count_parameters(net) == training
        assert count_parameters(net) - count_parameters(net.v_blocks) == inference
        boundary = load_config(UNetRunConfig, "unet", preset, ["imf.velocity_head=false"])
        no_head = build_network(boundary.model, boundary.cond, sizes_of(boundary, num_classes=1000))
    assert count_parameters(no_head) == inference - count_parameters(net.v_final)
    assert cfg.model.swiglu_hidden == int(cfg.model.hidden_size * 8 / 3)
    assert [name for name, _ in net.prefix_groups] == ["cond", "guidance", "t_min", "t_max", "step"]


def test_network_contract_and_the_official_parts():
    """The network starts at u = v = 0 and ignores t; RoPE is the official complex rotation of interleaved
    pairs (imfDiT.py:379-385); the interval is embedded as the paper's (1 - high, 1 - low); inputs are checked,
    and the other networks refuse the iMF inputs."""
    cfg, net = tiny(perturb=False)
    x, cond = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([0, 1])
    inputs = dict(interval=torch.tensor([0.5, 1.0], dtype=torch.float64), cond=cond,
                  guidance=torch.tensor([1.0, 8.0], dtype=torch.float64),
                  guidance_interval=torch.tensor([[0.3, 0.6], [0.0, 1.0]], dtype=torch.float64))
    u, v = net(x, torch.zeros(2, dtype=torch.float64), head="uv", **inputs)
    assert not u.any() and not v.any()
    _, net = tiny()
    torch.testing.assert_close(net(x, torch.zeros(2, dtype=torch.float64), **inputs),
                               net(x, torch.tensor([0.3, 0.9], dtype=torch.float64), **inputs), rtol=0, atol=0)
    # RoPE against the complex multiplication of the official code
    q = torch.randn(2, 3, 5, 8, generator=gen(10))
    cos, sin = rope_tables(5, 8, q.device, torch.float32)
    freqs = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)                 # imfDiT.py:371
    cis = torch.polar(torch.ones(5, 4), torch.outer(torch.arange(5, dtype=torch.float32), freqs))
    official = torch.view_as_real(torch.view_as_complex(q.reshape(2, 3, 5, 4, 2)) * cis).reshape(q.shape)
    torch.testing.assert_close(rotate(q, cos, sin), official)
    # the t_min embedder reads 1 - high
    seen = []
    net.t_min_emb.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    net(x, torch.zeros(2, dtype=torch.float64), **inputs)
    torch.testing.assert_close(seen[0], torch.tensor([0.4, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="guidance_interval must be"):
        net(x, torch.zeros(2, dtype=torch.float64), **{**inputs, "guidance_interval": None})
    with pytest.raises(ValueError, match="head must be one of"):
        net(x, torch.zeros(2, dtype=torch.float64), head="w", **inputs)
    _, no_head = tiny(["imf.velocity_head=false"])
    with pytest.raises(ValueError, match="needs a velocity head"):
        no_head(x, torch.zeros(2, dtype=torch.float64), head="v", **inputs)
    dit = load_config(UNetRunConfig, "unet", "dit-tiny", ["cond.type=class"])
    with pytest.raises(ValueError, match="cannot embed the inputs interval_only, guidance_interval, velocity_head"):
        build_network(dit.model, dit.cond, sizes_of(cfg, num_classes=NUM_CLASSES))
    with pytest.raises(ConfigError, match="model.arch.*objective=imf needs a network.*icdit"):
        load_config(UNetRunConfig, "unet", "imf-tiny", ["model.arch=dit"])
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config(UNetRunConfig, "unet", "imf-tiny", ["train.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="cond.type.*needs a condition"):
        load_config(UNetRunConfig, "unet", "imf-tiny", ["cond.type=none"])
    with pytest.raises(ConfigError, match="cond.drop"):
        load_config(UNetRunConfig, "unet", "imf-tiny", ["cond.drop=0"])
    with pytest.raises(ConfigError, match="sample.cfg_scale"):
        load_config(UNetRunConfig, "unet", "imf-tiny", ["sample.cfg_scale=0.5"])


# ----------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("steps", [1, 2])
def test_sampling_is_the_official_sample(steps):
    """The objective's sampler through guided(..., intrinsic=True) (what generation does) equals the
    transcription of imf.py's sample at w and the interval in the paper's time: 1 step is one forward."""
    cfg, net = tiny()
    noise, y = torch.randn(3, 4, 8, 8, generator=gen(11), dtype=torch.float64), torch.tensor([0, 1, 2])
    calls = []
    net.register_forward_hook(lambda module, args, out: calls.append(1))
    ours = Imf.sample(cfg.imf, "meanflow", guided(net, y, 8.0, intrinsic=True), noise, steps)
    assert len(calls) == steps
    low, high = cfg.imf.sample_interval
    u_p = theirs_from_ours(head(net, "u"))
    with torch.no_grad():
        theirs = reference_sample(u_p, noise, y, 8.0, 1 - high, 1 - low, steps)
    # (the sampler's h and the guided function's w are float32, as generation gives them: sinusoids of float32)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-8)
    # Euler and Heun integrate u at h = 0 with the same conditions.
    seen = []
    fn = lambda x, t, **inputs: seen.append(inputs) or torch.zeros_like(x)  # noqa: E731
    Imf.sample(cfg.imf, "heun", fn, noise, 2)
    assert all(torch.equal(i["interval"], torch.zeros(3)) and i["guidance_interval"][0].tolist() == [0.35, 0.6]
               for i in seen)
    assert Imf.sampling_problem(cfg.imf, "meanflow", 3) is None and Imf.eval_steps(cfg.imf) == (1, 2)


# ----------------------------------------------------------------------------- end to end

def test_trains_resumes_exports_loads_and_samples(shapes_dir, tiny_vae_run, tiny_imf_run, tmp_path):
    """objective=imf through train_unet.py (--config imf-tiny, class-conditional shapes): a run resumed at step 2
    ends with the straight run's (tiny_imf_run) weights; the export records the iMF inputs, loads, and samples
    at 1 and 2 steps through the objective's sampler as the network's own steps, and generate_latents (sample.py's
    path) gives the same images with cfg_scale = w."""
    import train_unet      # here: the two-process test's workers import this file
    from conftest import IMF_RUN_ARGS

    from modules.core.generation import GenerationSpec, generate_latents
    from modules.run.export import load_network, read_network_export, read_weights

    def run(out, *extra):
        train_unet.main([*IMF_RUN_ARGS, "--data", str(shapes_dir), "--vae", str(tiny_vae_run), "--output-dir", str(out),
                         f"cache_dir={tmp_path / 'cache'}", *extra])
    run(tmp_path / "split", "--max-steps", "2")
    run(tmp_path / "split", "--max-steps", "4", "--resume", "latest")
    for folder in ("unet", "unet_ema"):
        a, b = read_weights(tiny_imf_run / folder), read_weights(tmp_path / "split" / folder)
        assert a.keys() == b.keys() and any(k.startswith("v_blocks.") for k in a)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    export = read_network_export(tiny_imf_run / "unet")
    inputs = export.sizes.inputs
    assert export.config.objective == "imf" and export.config.model.arch == "icdit"
    assert (inputs.step, inputs.interval_only, inputs.guidance, inputs.guidance_interval, inputs.velocity_head) == \
        ("interval", True, True, True, True)
    net = load_network(tiny_imf_run / "unet")
    s = export.sizes
    noise = torch.randn(3, s.latent_channels, s.latent_size, s.latent_size, generator=gen(12))
    labels, w = torch.arange(3) % s.num_classes, 4.0
    interval = torch.tensor([export.config.imf.sample_interval]).expand(3, 2)
    conditions = dict(cond=labels, guidance=torch.full((3,), w), guidance_interval=interval)
    with torch.no_grad():
        one = noise + net(noise, torch.zeros(3), interval=torch.ones(3), **conditions)
        half = noise + 0.5 * net(noise, torch.zeros(3), interval=torch.full((3,), 0.5), **conditions)
        two = half + 0.5 * net(half, torch.full((3,), 0.5), interval=torch.full((3,), 0.5), **conditions)
    for steps, expected in ((1, one), (2, two)):
        out = Imf.sample(export.config.imf, "meanflow", guided(net, labels, w, intrinsic=True), noise, steps)
        assert torch.isfinite(out).all() and not torch.equal(out, noise)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    latents = generate_latents(net, GenerationSpec.of(export.config, export.sizes), labels, [0, 1, 2], 1,
                               cfg_scale=w)
    assert latents.shape == noise.shape and torch.isfinite(latents).all()


# ----------------------------------------------------------------------------- sample.py's guidance settings

def decoded_latents(monkeypatch) -> list:
    """The latents sample.py decodes, batch by batch (a spy on its decode_latents)."""
    import sample
    seen, decode = [], sample.decode_latents
    monkeypatch.setattr(sample, "decode_latents",
                        lambda vae, z, *a, **k: seen.append(z.clone()) or decode(vae, z, *a, **k))
    return seen


@pytest.mark.parametrize("steps", [1, 2])
def test_sample_py_with_a_guidance_interval_is_the_official_sampler(tiny_imf_run, tmp_path, monkeypatch, steps):
    """sample.py --cfg-scale 4 --guidance-interval 0.2 0.7 at 1 and 2 steps: the latents it decodes equal direct
    calls of the network as imf.py's sampler makes them (one forward per step, w and the interval as inputs, the
    same interval at every step) and the transcription of imf.py's sample at the paper's [0.3, 0.8]; another
    interval gives other latents; the manifest and request.json record the interval."""
    import json

    import sample
    from modules.core.seeding import image_seed, initial_noise
    from modules.run.export import load_network, read_network_export

    seen = decoded_latents(monkeypatch)
    out = tmp_path / "s"
    sample.main(["--unet", str(tiny_imf_run), "--out", str(out), "--num-samples", "3", "--batch-size", "3",
                 "--steps", str(steps), "--cfg-scale", "4", "--guidance-interval", "0.2", "0.7", "--device", "cpu"])
    s = read_network_export(tiny_imf_run / "unet_ema").sizes
    net = load_network(tiny_imf_run / "unet_ema")
    noise = initial_noise([image_seed(0, i) for i in range(3)], (s.latent_channels, s.latent_size, s.latent_size))
    labels = torch.arange(3) % s.num_classes

    def direct(low, high):
        given = dict(cond=labels, guidance=torch.full((3,), 4.0), guidance_interval=torch.tensor([[low, high]] * 3))
        z = noise
        with torch.no_grad():
            for i in range(steps):
                z = z + net(z, torch.full((3,), i / steps), interval=torch.full((3,), 1 / steps), **given) / steps
        return z

    torch.testing.assert_close(seen[0], direct(0.2, 0.7), rtol=1e-5, atol=1e-6)
    assert not torch.equal(direct(0.2, 0.7), direct(0.35, 0.6))
    with torch.no_grad():
        official = reference_sample(theirs_from_ours(head(net, "u")), noise, labels, 4.0, 0.3, 0.8, steps)
    torch.testing.assert_close(seen[0], official, rtol=1e-5, atol=1e-5)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["guidance"] == 4.0 and r["guidance_interval"] == [0.2, 0.7] for r in records)
    assert json.loads((out / "request.json").read_text())["guidance_interval"] == [0.2, 0.7]


def test_sample_py_defaults_to_the_models_setting_and_refuses_another_interval(tiny_imf_run, tiny_unet_run, tmp_path,
                                                                               monkeypatch):
    """Without --cfg-scale and --guidance-interval an iMF model samples at imf.sample_scale and imf.sample_interval
    (recorded in request.json; the same latents as naming them); the same request again continues, another
    interval in the same folder is refused in one line; --guidance-interval is refused for a model that takes
    none and for a reversed interval, before anything is written."""
    import json

    import sample
    from modules.core.generation import GenerationSpec, generate_latents
    from modules.core.seeding import image_seed
    from modules.run.export import load_network, read_network_export

    seen = decoded_latents(monkeypatch)
    out = tmp_path / "s"
    base = ["--unet", str(tiny_imf_run), "--out", str(out), "--num-samples", "2", "--batch-size", "2",
            "--device", "cpu"]
    sample.main(base)
    export = read_network_export(tiny_imf_run / "unet_ema")
    request = json.loads((out / "request.json").read_text())
    assert request["cfg_scale"] == export.config.imf.sample_scale == 8.0
    assert request["guidance_interval"] == list(export.config.imf.sample_interval) == [0.35, 0.6]
    named = generate_latents(load_network(tiny_imf_run / "unet_ema"), GenerationSpec.of(export.config, export.sizes),
                             torch.arange(2) % export.sizes.num_classes, [image_seed(0, i) for i in range(2)], 1,
                             cfg_scale=8.0, guidance_interval=(0.35, 0.6))
    torch.testing.assert_close(seen[0], named, rtol=0, atol=0)
    sample.main([*base, "--cfg-scale", "8", "--guidance-interval", "0.35", "0.6"])      # the same request: continues
    assert len(seen) == 1
    with pytest.raises(ConfigError, match=r"already holds images of another request \(request.json: "
                                          r"guidance_interval: \[0.35, 0.6\] != \[0.3, 0.6\]\)"):
        sample.main([*base, "--guidance-interval", "0.3", "0.6"])
    for model, interval, message in ((tiny_imf_run, ("0.7", "0.2"), "must be two times 0 <= low < high <= 1"),
                                     (tiny_unet_run, ("0.2", "0.7"), "a shortcut model takes no guidance interval")):
        with pytest.raises(ConfigError, match=f"--guidance-interval {interval[0]} {interval[1]}: {message}"):
            sample.main(["--unet", str(model), "--out", str(tmp_path / "refused"), "--guidance-interval", *interval])
        assert not (tmp_path / "refused").exists()
