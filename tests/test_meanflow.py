"""MeanFlow (modules/meanflow.py) against closed forms: Gaussian data, where the velocity field and the
average velocity over any interval are known exactly; the JVP against finite differences; the
sampler; the time draws, the adaptive weight and the folded guidance; training end to end; the draws,
the guidance queries and the loss against a transcription of the official code (REFERENCE below)."""
import math

import pytest
import torch
from support import network_of
from torch.func import jvp

from modules.config.io import load_config
from modules.config.schema import UNetRunConfig
from modules.core.attention import attention, forward_ad_attention
from modules.core.objectives.base import Draws
from modules.core.objectives.base import average_velocity_jvp
from modules.core.objectives.meanflow import MeanFlow, MeanFlowConfig, MeanFlowDraws, num_equal
from modules.core.samplers import sample_meanflow
from modules.core.samplers import sample_euler

MU, SIGMA = 1.5, 0.5       # data x1 ~ N(MU, SIGMA^2) per element, noise x0 ~ N(0, 1)
SHAPE = (3, 4, 4)


def spread(t):
    """Standard deviation of x_t = (1 - t) x0 + t x1."""
    return torch.sqrt((1 - t) ** 2 + (t * SIGMA) ** 2)


def view(t, x):
    return t.view(-1, *([1] * (x.dim() - 1)))


def true_velocity(z, t):
    """E[x1 - x0 | x_t = z] = MU + (t SIGMA^2 - (1 - t)) / spread^2 (z - t MU)."""
    t = view(t, z)
    return MU + (t * SIGMA ** 2 - (1 - t)) / spread(t) ** 2 * (z - t * MU)


def true_average_velocity(z, t, interval=None, cond=None, drop=None):
    """The exact u(z, t, s = t + h): the flow keeps z's standard score, z_tau = tau MU + spread(tau) xi, so
    u = (z_s - z_t) / (s - t) = MU + (spread(s) - spread(t)) / ((s - t) spread(t)) (z - t MU); at h = 0, v."""
    h = view(interval, z)
    tb = view(t, z)
    safe = torch.where(h > 0, h, torch.ones_like(h))
    slope = torch.where(h > 0, (spread(tb + safe) - spread(tb)) / (safe * spread(tb)),
                        (tb * SIGMA ** 2 - (1 - tb)) / spread(tb) ** 2)
    return MU + slope * (z - tb * MU)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_target_with_the_exact_average_velocity_is_exact():
    """u = v + (s - t) du/dt with the true v and u (our time: t = 0 noise, tangent (v, 1, 0))."""
    g = gen(0)
    n = 64
    t = torch.rand(n, generator=g) * 0.9
    s = t + (1 - t) * torch.rand(n, generator=g)
    z = t.view(-1, 1, 1, 1) * MU + spread(t).view(-1, 1, 1, 1) * torch.randn(n, *SHAPE, generator=g)
    v = true_velocity(z, t)
    u, du_dt = average_velocity_jvp(true_average_velocity, z, t, s, v)
    target = v + view(s - t, v) * du_dt
    exact = true_average_velocity(z, t, s - t)
    torch.testing.assert_close(u, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(target, exact, rtol=1e-5, atol=1e-5)
    # The paper's sign, transcribed without mirroring its time (v - (s - t) du/dt), is wrong here.
    wrong = v - view(s - t, v) * du_dt
    assert (wrong - exact).abs().max() > 0.1


@pytest.mark.parametrize("preset", ["tiny", "dit-tiny"])
def test_jvp_through_the_network_equals_a_central_difference(preset):
    """du/dt along the flow through a real network (attention included), float64, against
    (u(z + e v, t + e, s) - u(z - e v, t - e, s)) / 2e."""
    cfg = load_config(UNetRunConfig, "unet", preset, ["objective=meanflow", "cond.type=class"])
    torch.manual_seed(0)
    net = network_of(cfg, num_classes=3, downsample=2).double()
    with torch.no_grad():
        for p in net.parameters():      # move the zero-initialised layers off zero, so every path counts
            p.add_(0.05 * torch.randn_like(p))
    g = gen(1)
    z, v = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g,
                                                                                   dtype=torch.float64)
    t, s = torch.tensor([0.2, 0.5], dtype=torch.float64), torch.tensor([0.7, 0.9], dtype=torch.float64)
    cond, drop = torch.tensor([0, 2]), torch.tensor([False, True])
    u, du_dt = average_velocity_jvp(net, z, t, s, v, cond, drop)
    eps = 1e-7
    with torch.no_grad():
        ahead = net(z + eps * v, t + eps, interval=s - t - eps, cond=cond, drop=drop)
        behind = net(z - eps * v, t - eps, interval=s - t + eps, cond=cond, drop=drop)
    torch.testing.assert_close(du_dt, (ahead - behind) / (2 * eps), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u, net(z, t, interval=s - t, cond=cond, drop=drop), rtol=0, atol=1e-12)


def test_attention_takes_the_math_backend_inside_the_jvp():
    """torch 2.13's CPU SDPA picks its flash kernel, which has no forward-mode formula; inside
    forward_ad_attention the JVP passes and matches a central difference."""
    g = gen(2)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    tangents = tuple(torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(attention, (q, k, v), tangents)
    with forward_ad_attention():
        out, d_out = torch.func.jvp(attention, (q.double(), k.double(), v.double()),
                                    tuple(x.double() for x in tangents))
    eps = 1e-6
    shifted = [attention(*(x.double() + sign * eps * dx.double() for x, dx in zip((q, k, v), tangents)))
               for sign in (1, -1)]
    torch.testing.assert_close(d_out, (shifted[0] - shifted[1]) / (2 * eps), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kernel", [
    lambda q, k, v: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v),
    lambda q, k, v: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False),
    lambda q, k, v: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False),
], ids=["flash", "memory_efficient", "cudnn"])
def test_the_fused_cuda_attention_kernels_have_no_forward_mode_formula(kernel):
    """The claim behind forcing the math backend, checked without a GPU: torch's autograd layer (the same
    on every device) refuses forward AD through the CUDA kernels; on meta tensors it answers before any
    kernel would run. The math kernel passes."""
    import torch.autograd.forward_ad as fwad
    q, k, v = (torch.empty(1, 2, 16, 8, device="meta") for _ in range(3))
    with fwad.dual_level():
        dual = fwad.make_dual(q, torch.empty_like(q))
        with pytest.raises(NotImplementedError, match="forward AD"):
            kernel(dual, k, v)
        out = torch.ops.aten._scaled_dot_product_attention_math(dual, k, v)[0]
        assert fwad.unpack_dual(out).tangent is not None


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_meanflow_sampler_with_the_exact_average_velocity_lands_on_the_data_distribution(steps):
    """Each step follows the exact trajectory, so noise x0 maps to MU + SIGMA x0: exactly N(MU, SIGMA^2)."""
    noise = torch.randn(256, *SHAPE, generator=gen(3))
    out = sample_meanflow(true_average_velocity, noise, steps)
    torch.testing.assert_close(out, MU + SIGMA * noise, rtol=0, atol=2e-6)
    # One Euler step with the instantaneous velocity does not (that is what MeanFlow fixes).
    euler = sample_euler(lambda x, t: true_velocity(x, t), noise, 1)
    assert (euler - (MU + SIGMA * noise)).abs().max() > 0.5


def test_time_draws_mirror_the_papers_logit_normal():
    """Non-equal rows: {logit t, logit s} are two N(0.4, 1) draws (the paper's N(-0.4, 1) over 1 - time);
    s >= t; the first floor(0.75 B) rows have s = t."""
    objective = MeanFlow(MeanFlowConfig())
    t, s = objective.sample_times(40000, gen(4), torch.device("cpu"))
    equal = num_equal(40000, 0.75)
    assert equal == 30000 and torch.equal(t[:equal], s[:equal]) and (s[equal:] > t[equal:]).all()
    logits = torch.logit(torch.cat([t[equal:], s[equal:]]).double())
    assert abs(logits.mean().item() - 0.4) < 0.03 and abs(logits.std().item() - 1.0) < 0.03
    paper_time = torch.logit(1 - torch.cat([t[equal:], s[equal:]]).double())   # the paper's r, t
    assert abs(paper_time.mean().item() + 0.4) < 0.03


class Constant(torch.nn.Module):
    """u = a learnable constant per element (ignores its inputs)."""

    def __init__(self, value):
        super().__init__()
        self.value = torch.nn.Parameter(value.clone())

    def forward(self, x, t, interval=None, cond=None, drop=None):
        return self.value.expand_as(x)


@pytest.mark.parametrize("power", [0.0, 1.0])
def test_adaptive_weight_loss_value_and_gradient(power):
    """A constant u has du/dt = 0, so the target is v; loss = mean(sq / (sq + c)^p), gradient per row
    2 (u - v) / (sq + c)^p (the weight is stop-gradient)."""
    cfg = MeanFlowConfig(loss_power=power, loss_eps=0.5)
    x1 = torch.randn(4, *SHAPE, generator=gen(5))
    model = Constant(torch.randn(*SHAPE, generator=gen(6)))
    noise = torch.randn(4, *SHAPE, generator=gen(7))
    loss, logs = MeanFlow(cfg).loss(model, x1, None, Draws(gen(8), noise=noise))
    delta = model.value.detach() - (x1 - noise)
    sq = delta.pow(2).flatten(1).sum(1)
    torch.testing.assert_close(loss, (sq / (sq + 0.5) ** power).mean())
    loss.backward()
    expected = (2 * delta / view((sq + 0.5) ** power, delta)).sum(0) / 4
    torch.testing.assert_close(model.value.grad, expected)
    torch.testing.assert_close(logs["loss_flow"], sq[:3].mean() / delta[0].numel())
    torch.testing.assert_close(logs["loss_interval"], sq[3:].mean() / delta[0].numel())


def test_guidance_is_folded_into_the_velocity_inside_its_interval():
    """v_g = omega v + kappa u_c + (1 - omega - kappa) u_null for rows with their condition and t in the
    interval; v on dropped rows and outside; the queries are at h = 0."""
    cfg = MeanFlowConfig(omega=2.0, kappa=0.25, guidance_interval=(0.3, 0.8))
    calls = []

    def model(x, t, interval=None, cond=None, drop=None):
        calls.append(interval)
        return torch.where(drop.view(-1, 1, 1, 1), -1.0, 3.0).expand_as(x)   # u_null = -1, u_cond = 3

    t = torch.tensor([0.1, 0.3, 0.5, 0.8, 0.9, 0.5])
    drop = torch.tensor([False, False, False, False, False, True])
    v = torch.randn(6, *SHAPE, generator=gen(9))
    v_g = MeanFlow(cfg).guided_velocity(model, torch.zeros_like(v), t, v, torch.arange(6), drop)
    inside = torch.tensor([False, True, True, True, False, False])
    torch.testing.assert_close(v_g[inside], 2.0 * v[inside] + 0.25 * 3.0 + (1 - 2.0 - 0.25) * -1.0)
    torch.testing.assert_close(v_g[~inside], v[~inside])
    assert all(torch.equal(level, torch.zeros_like(level)) for level in calls)


# ================================================================================== REFERENCE
# A float64 transcription of the official MeanFlow training code, github.com/Gsunshine/meanflow at d70cb55
# (the JAX code of the paper's ImageNet runs, with guidance and class dropout; cited as meanflow.py:LINE), in
# THEIR time: t = 1 noise, t = 0 data, z_t = (1 - t) x + t e, v = e - x, r <= t. Its random draws are
# given (normals, uniforms) instead of drawn. (The official PyTorch port, github.com/Gsunshine/py-meanflow at
# 1f6d72d, trains unconditional CIFAR-10: no guidance or dropout, and it draws the r = t rows by a Bernoulli
# mask, models/time_sampler.py:35-37; the JAX code is the reference for the class-conditional recipe.)

def reference_sample_tr(normal_t, normal_r, p_mean=-0.4, p_std=1.0, data_proportion=0.75):
    """meanflow.py:138-157."""
    bz = normal_t.shape[0]
    t = torch.sigmoid(normal_t * p_std + p_mean)                  # meanflow.py:139-142
    r = torch.sigmoid(normal_r * p_std + p_mean)
    t, r = torch.maximum(t, r), torch.minimum(t, r)               # meanflow.py:150
    data_size = int(bz * data_proportion)                         # meanflow.py:152
    zero_mask = torch.arange(bz) < data_size                      # meanflow.py:153
    return t, torch.where(zero_mask, t, r)                        # meanflow.py:155


def reference_drop_mask(uniform, class_dropout_prob=0.1):
    """meanflow.py:194-196: as many rows as uniforms below p, the first ones."""
    num_drop = (uniform < class_dropout_prob).sum()               # meanflow.py:194-195
    return torch.arange(uniform.shape[0]) < num_drop              # meanflow.py:196


def reference_guidance(u_fn, v_t, z_t, t, y, null_label, omega, kappa, t_start, t_end):
    """guidance_fn, meanflow.py:171-189 (guidance_eq 'cfg'); v_fn (meanflow.py:167-169) = u at h = 0. The
    official calls it with train=False (meanflow.py:219): ``u_fn`` is the network in eval mode."""
    zeros = torch.zeros_like(t)
    y_null = torch.full_like(y, null_label)                       # meanflow.py:173, 179
    v_uncond = u_fn(z_t, t, zeros, y_null)                        # meanflow.py:174, 180
    inside = (t >= t_start) & (t <= t_end)
    if kappa == 0:
        w = torch.where(inside, omega, 1.0).view(-1, 1, 1, 1)     # meanflow.py:176
        return v_uncond + w * (v_t - v_uncond)                    # meanflow.py:177
    v_cond = u_fn(z_t, t, zeros, y)                               # meanflow.py:181
    w = torch.where(inside, omega, 1.0).view(-1, 1, 1, 1)         # meanflow.py:183
    k = torch.where(inside, kappa, 0.0).view(-1, 1, 1, 1)         # meanflow.py:184
    return w * v_t + (1 - w - k) * v_uncond + k * v_cond          # meanflow.py:185


def reference_meanflow_loss(u_fn, x, e, t, r, y, drop_mask, null_label, omega, kappa, t_start, t_end,
                            norm_eps=0.01, norm_p=1.0):
    """forward, meanflow.py:206-246; ``u_fn(z, t, h, y)`` the network. Returns the loss."""
    tb, rb = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    z_t = (1 - tb) * x + tb * e                                   # meanflow.py:215
    v = e - x                                                     # meanflow.py:216
    with torch.no_grad():
        v_g = reference_guidance(u_fn, v, z_t, t, y, null_label, omega, kappa, t_start, t_end)   # meanflow.py:219
    y_inp = torch.where(drop_mask, null_label, y)                 # meanflow.py:198
    v_g = torch.where(drop_mask.view(-1, 1, 1, 1), v, v_g)        # meanflow.py:199
    u, du_dt = jvp(lambda z, t_, r_: u_fn(z, t_, t_ - r_, y_inp), (z_t, t, r),
                   (v_g, torch.ones_like(t), torch.zeros_like(r)))   # meanflow.py:226-231
    u_tgt = (v_g - torch.clamp(tb - rb, 0.0, 1.0) * du_dt).detach()   # meanflow.py:235-236
    loss = ((u - u_tgt) ** 2).sum(dim=(1, 2, 3))                  # meanflow.py:238-239
    loss = loss / ((loss + norm_eps) ** norm_p).detach()          # meanflow.py:242-243
    return loss.mean()                                            # meanflow.py:246
# ================================================================================== end of REFERENCE


def theirs(net):
    """Our network (u over [t, s], our time, null = drop) as the official u_fn(z, t, h, y) of their time."""
    null = net.conditioner.num_classes

    def u_fn(z, t_p, h, y):
        return -net(z, 1 - t_p, interval=h, cond=torch.where(y == null, 0, y), drop=y == null)
    return u_fn


@pytest.mark.parametrize("n", [7, 10, 33, 64])
def test_draws_are_the_official_draws(n):
    """The same normals and uniforms give the official (t, r) mirrored (t, s) = (1 - t_p, 1 - r_p), floor(0.75 n)
    rows with s = t (n = 10: 7, where rounding gave 8), and the official dropped rows: the first ones, all s = t
    rows; ``meanflow.drop_rows=random`` drops the drawn rows instead."""
    objective = MeanFlow(MeanFlowConfig(), cond_drop=0.3)
    for seed in range(20):
        d = objective.draw(n, True, gen(seed), torch.device("cpu"))
        g = gen(seed)
        z = torch.randn(2, n, generator=g)      # our draws, in their order: the times' normals, the dropout's uniforms
        uniform = torch.rand(n, generator=g)
        t_p, r_p = reference_sample_tr(-z[0].double(), -z[1].double())   # logit-normal(-0.4) of 1 - our time
        torch.testing.assert_close(d.t.double(), 1 - t_p, rtol=0, atol=1e-6)
        torch.testing.assert_close(d.s.double(), 1 - r_p, rtol=0, atol=1e-6)
        assert d.equal == int(n * 0.75) and torch.equal(d.t[:d.equal], d.s[:d.equal])
        assert torch.equal(d.drop, reference_drop_mask(uniform, 0.3))
        if d.drop.sum() <= d.equal:                  # dropped rows are s = t rows
            assert not (d.drop & (d.s != d.t)).any()
    assert num_equal(10, 0.75) == 7
    anywhere = MeanFlow(MeanFlowConfig(drop_rows="random"), cond_drop=0.3).draw(n, True, gen(0), torch.device("cpu"))
    g = gen(0)
    torch.randn(2, n, generator=g)
    assert torch.equal(anywhere.drop, torch.rand(n, generator=g) < 0.3)


def test_guidance_queries_run_in_eval_mode_as_the_official():
    """A UNet with model.dropout=0.5 in train mode: the folded guidance's queries equal the official guidance_fn
    with the network in eval mode (train=False, meanflow.py:219), and every module is in its mode again
    after; in train mode the dropout would change them."""
    cfg = load_config(UNetRunConfig, "unet", "tiny", ["objective=meanflow", "cond.type=class", "model.dropout=0.5",
                                                      "meanflow.omega=2.0", "meanflow.kappa=0.5"])
    torch.manual_seed(0)
    net = network_of(cfg, num_classes=3, downsample=4).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.train()
    net.conditioner.eval()          # a submodule left in eval mode stays so
    modes = {name: m.training for name, m in net.named_modules()}
    g = gen(3)
    z, v = (torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    t, y = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    ours = MeanFlow(cfg.meanflow).guided_velocity(net, z, t, v, y, torch.zeros(4, dtype=torch.bool))
    assert {name: m.training for name, m in net.named_modules()} == modes
    net.eval()
    with torch.no_grad():
        official = -reference_guidance(theirs(net), -v, z, 1 - t, y, 3, 2.0, 0.5, 0.0, 1.0)
    torch.testing.assert_close(ours, official, rtol=1e-10, atol=1e-12)
    net.train()
    with torch.no_grad():
        train_mode = -reference_guidance(theirs(net), -v, z, 1 - t, y, 3, 2.0, 0.5, 0.0, 1.0)
    assert not torch.allclose(train_mode, official)


def test_loss_and_gradient_equal_the_official_transcription():
    """Folded guidance (omega 2, kappa 0.5, interval (0.3, 0.6) here: the official [t_start, t_end] = [0.4, 0.7]),
    class dropout on the first rows, B = 10 (7 rows s = t): in float64 through the tiny DiT, the loss and every
    parameter's gradient equal the transcription of meanflow.py on the same draws in the paper's time."""
    cfg = load_config(UNetRunConfig, "unet", "dit-tiny", ["objective=meanflow", "cond.type=class", "meanflow.omega=2.0",
                                                          "meanflow.kappa=0.5", "meanflow.guidance_interval=0.3,0.6"])
    torch.manual_seed(0)
    net = network_of(cfg, num_classes=3, downsample=4).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    objective = MeanFlow(cfg.meanflow, cond_drop=0.3)
    b = 10
    d = objective.draw(b, True, gen(5), torch.device("cpu"))
    d = MeanFlowDraws(d.t.double(), d.s.double(), torch.arange(b) < 2, d.equal)
    inside = (d.t >= 0.3) & (d.t <= 0.6)
    assert d.equal == 7 and inside[2:].any() and not inside[2:].all()
    g = gen(6)
    x1, x0 = (torch.randn(b, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    y = torch.randint(0, 3, (b,), generator=g)
    loss, _ = objective.loss_of(net, x1, x0, y, d)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    with forward_ad_attention():        # SDPA's math backend: its fused kernels have no forward-mode formula
        official = reference_meanflow_loss(theirs(net), x=x1, e=x0, t=1 - d.t, r=1 - d.s, y=y, drop_mask=d.drop,
                                           null_label=3, omega=2.0, kappa=0.5, t_start=0.4, t_end=0.7)
    official.backward()
    torch.testing.assert_close(loss, official, rtol=1e-10, atol=1e-12)
    for n, p in net.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-8, atol=1e-12, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("preset", ["tiny", "dit-tiny"])
def test_the_jvp_runs_under_bf16_autocast(preset):
    """Under CPU bf16 autocast (what Accelerate puts in the forward of a bf16 run) the JVP passes through
    the UNet's float32 GroupNorm and the DiT, its loss is within bf16 rounding of the float32 loss, and
    the gradients are finite."""
    cfg = load_config(UNetRunConfig, "unet", preset, ["objective=meanflow", "meanflow.loss_power=0"])
    torch.manual_seed(0)
    net = network_of(cfg, downsample=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x1 = torch.randn(4, 4, 8, 8, generator=gen(10))
    objective = MeanFlow(cfg.meanflow)
    plain, _ = objective.loss(net, x1, None, Draws(gen(11)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = objective.loss(net, x1, None, Draws(gen(11)))
    mixed.backward()
    assert math.isclose(mixed.item(), plain.item(), rel_tol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- the JVP through every engine

def _jvp_engines_worker(rank, port):
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel

    from modules.core.networks.unet import ResBlock

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = load_config(UNetRunConfig, "unet", "tiny", ["objective=meanflow", "cond.type=class"])
        torch.manual_seed(0)
        reference = network_of(cfg, num_classes=3).double()
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
        g = gen(1)     # the same inputs on both ranks, so DDP's averaged gradient is the single-process one
        z, v, w = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
        t, s = torch.tensor([0.2, 0.5], dtype=torch.float64), torch.tensor([0.7, 0.9], dtype=torch.float64)
        cond, drop = torch.tensor([0, 2]), torch.tensor([False, True])

        def run(model):
            u, du_dt = average_velocity_jvp(model, z, t, s, v, cond, drop)
            (u * w).sum().backward()
            return u.detach(), du_dt

        u_ref, du_ref = run(reference)
        grads_ref = {n: p.grad for n, p in reference.named_parameters()}

        def fresh():
            net = network_of(cfg, num_classes=3).double()
            net.load_state_dict(reference.state_dict())
            return net

        def fsdp2(net):
            for m in net.modules():
                if isinstance(m, ResBlock):
                    fully_shard(m)
            return fully_shard(net)

        engines = {
            "ddp": lambda: DistributedDataParallel(fresh()),
            "fsdp1": lambda: FullyShardedDataParallel(fresh(), device_id=torch.device("cpu"), use_orig_params=True,
                                                      auto_wrap_policy=ModuleWrapPolicy({ResBlock})),
            "fsdp2": lambda: fsdp2(fresh()),
            "compiled": lambda: torch.compile(fresh(), backend="aot_eager"),
            "compiled ddp": lambda: torch.compile(DistributedDataParallel(fresh()), backend="aot_eager"),
        }
        for name, build in engines.items():
            model = build()
            for _ in range(2):      # DDP rebuilds its buckets at the second forward
                model.zero_grad()
                u, du_dt = run(model)
            torch.testing.assert_close(u, u_ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: u {m}")
            torch.testing.assert_close(du_dt, du_ref, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: du/dt {m}")
            if name == "fsdp1":
                with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
                    grads = {n.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                             for n, p in model.named_parameters()}
            else:
                grads = {n.replace("_orig_mod.", "").replace("module.", "", 1) if "ddp" in name or name == "compiled"
                         else n: p.grad.full_tensor() if name == "fsdp2" else p.grad
                         for n, p in model.named_parameters()}
            assert grads.keys() == grads_ref.keys(), name
            for n, grad in grads.items():
                torch.testing.assert_close(grad, grads_ref[n], rtol=1e-8, atol=1e-10,
                                           msg=lambda m: f"{name}: gradient of {n} {m}")
        # Under CPU bf16 autocast too (DDP takes the forward-AD path): the UNet's norms keep their tangents
        # in the output's dtype; a float32 LayerNorm tangent beside a bf16 output stopped the next linear.
        ddp = DistributedDataParallel(fresh().float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            u, du_dt = average_velocity_jvp(ddp, z.float(), t.float(), s.float(), v.float(), cond, drop)
        for got, want in ((u, u_ref), (du_dt, du_ref)):
            assert ((got.double() - want).norm() / want.norm()).item() < 0.05
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)     # as in tests/test_ema.py: no interpreter teardown under gloo's threads


def test_the_jvp_and_its_gradient_are_the_same_through_ddp_fsdp_and_compile():
    """The average velocity, its JVP and the loss gradient equal the plain module's (float64) through DDP,
    FSDP1, FSDP2, torch.compile and compiled DDP on two CPU ranks, and DDP's within bf16 rounding under
    autocast. torch.func.jvp fails inside DDP and
    FSDP1, forward_ad inside FSDP2 and compiled modules (modules/core/objectives/base.py: _runs_forward_ad)."""
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_jvp_engines_worker, args=(port,), nprocs=2)
