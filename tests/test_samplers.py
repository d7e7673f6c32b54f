"""Samplers against closed forms: Gaussian data with exact velocity / epsilon models."""
import pytest
import torch

from modules.core.objectives import OBJECTIVES, SAMPLERS
from modules.core.objectives.ddpm import DDPMConfig, DDPMSchedule, ddim_timesteps, sample_ddim
from modules.core.objectives.flow import FlowConfig
from modules.core.objectives.meanflow import MeanFlowConfig
from modules.core.objectives.shortcut import ShortcutConfig
from modules.core.samplers import guided, sample_euler, sample_heun
from modules.core.seeding import initial_noise, noise_generators

N = 16384   # samples for mean/variance checks: standard errors ~ 0.012 (mean), 1.1% (variance)
SHAPE = (4, 2, 2)
MU = torch.linspace(-1.0, 1.0, 16).view(*SHAPE)
STD = torch.linspace(0.3, 1.5, 16).view(*SHAPE)


def gaussian_velocity(x, t, level=None):
    """E[x1 - x0 | x_t] for x1 ~ N(MU, STD^2) per dim, x0 ~ N(0, 1), x_t = (1 - t) x0 + t x1."""
    t = t.view(-1, 1, 1, 1)
    var = (1 - t) ** 2 + t ** 2 * STD ** 2
    return MU + (t * STD ** 2 - (1 - t)) / var * (x - t * MU)


def flow_exact(noise):
    """The probability-flow map of the Gaussian: x1 = MU + STD x0."""
    return MU + STD * noise


SCHEDULE = DDPMSchedule()


def gaussian_epsilon(x, t, level=None):
    """E[eps | x_t] for x_t = sqrt(abar) x1 + sqrt(1 - abar) eps, the same Gaussian data."""
    a = SCHEDULE.alphas_cumprod[(t * 1000).round().long()].float().view(-1, 1, 1, 1)
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * STD ** 2 + 1 - a)


def ddim_exact(noise):
    """DDIM's ODE keeps the standardised value of x: from timestep 999 to the data."""
    a = SCHEDULE.alphas_cumprod[999].float()
    return MU + STD * (noise - a.sqrt() * MU) / (a * STD ** 2 + 1 - a).sqrt()


def sampling_problem(objective, sampler, steps, denoise_timesteps, num_timesteps):
    """The objective's rule for a model trained with M = denoise_timesteps (shortcut) or T = num_timesteps (DDPM)."""
    cfg = {"shortcut": ShortcutConfig(denoise_timesteps=denoise_timesteps),
           "ddpm": DDPMConfig(num_timesteps=num_timesteps)}.get(objective) or OBJECTIVES[objective].Config()
    return OBJECTIVES[objective].sampling_problem(cfg, sampler, steps)


def rms(a, b):
    return ((a - b) ** 2).mean().sqrt().item()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small element-wise loops run far faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def noise(one_thread):
    return initial_noise(range(N), SHAPE)


# ----------------------------------------------------------------------------- flow ODE

def test_euler_converges_to_the_gaussian(noise):
    errors = {n: rms(sample_euler(gaussian_velocity, noise, n), flow_exact(noise)) for n in (1, 4, 32)}
    assert errors[1] > errors[4] > errors[32]
    assert errors[32] < 0.05 and errors[1] > 0.5     # measured 0.98, 0.28, 0.040
    out = sample_euler(gaussian_velocity, noise, 256)
    assert (out.mean(0) - MU).abs().max() < 0.05          # measured 0.012
    assert ((out.var(0) / STD ** 2) - 1).abs().max() < 0.06   # measured 0.031
    assert torch.allclose(sample_euler(gaussian_velocity, noise, 1), MU.expand_as(noise), atol=1e-5)


def test_heun_beats_euler(noise):
    exact = flow_exact(noise)
    for n in (2, 4, 8):
        assert rms(sample_heun(gaussian_velocity, noise, n), exact) < rms(sample_euler(gaussian_velocity, noise, n),
                                                                           exact) / 3
    assert rms(sample_heun(gaussian_velocity, noise, 8), exact) < 5e-3   # measured 3.6e-3; Euler 0.15


def test_shortcut_sampler_is_exact_on_straight_paths():
    c = torch.linspace(-2, 2, 16).view(1, *SHAPE)
    seen = []

    def point_velocity(x, t, level):
        seen.append((t.clone(), level.clone()))
        return (c - x) / (1 - t).view(-1, 1, 1, 1)

    x0 = initial_noise(range(8), SHAPE)
    for steps in (1, 2, 4, 128):
        seen.clear()
        out = OBJECTIVES["shortcut"].sample(ShortcutConfig(), "shortcut", point_velocity, x0, steps)
        assert torch.allclose(out, c.expand_as(out), atol=1e-5)
        assert [round(t[0].item() * steps) for t, _ in seen] == list(range(steps))
        assert all((lvl == steps.bit_length() - 1).all() for _, lvl in seen)


def test_shortcut_step_counts_the_model_cannot_do_are_named():
    """The rule lives with the config (sampling_problem); samplers trust a checked request."""
    for steps in (3, 6, 256):
        assert "power of two between 1 and the model's denoise_timesteps=128" in \
            sampling_problem("shortcut", "shortcut", steps, 128, 1000)
    assert "steps must be an integer >= 1" in sampling_problem("shortcut", "shortcut", 0, 128, 1000)
    assert sampling_problem("shortcut", "shortcut", 128, 128, 1000) is None


# ----------------------------------------------------------------------------- epsilon samplers

def test_ddim_timesteps_trailing():
    assert ddim_timesteps(1000, 1) == [999]
    assert ddim_timesteps(1000, 4) == [999, 749, 499, 249]
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert "<= the schedule's 1000" in sampling_problem("ddpm", "ddim", 1001, 128, 1000)


def test_ddim_converges_to_the_gaussian(noise):
    errors = {n: rms(sample_ddim(gaussian_epsilon, noise, n, SCHEDULE), ddim_exact(noise)) for n in (1, 4, 32)}
    assert errors[1] > errors[4] > errors[32]
    assert errors[32] < 0.06                         # measured 0.90, 0.29, 0.048
    out = sample_ddim(gaussian_epsilon, noise, 250, SCHEDULE)
    # The schedule ends at abar = 0.0047, not 0: the reference mean/variance account for it.
    a = SCHEDULE.alphas_cumprod[999].float()
    total = a * STD ** 2 + 1 - a
    ref_mean, ref_var = MU - STD * a.sqrt() * MU / total.sqrt(), STD ** 2 / total
    assert (out.mean(0) - ref_mean).abs().max() < 0.05     # measured 0.013
    assert ((out.var(0) / ref_var) - 1).abs().max() < 0.1   # measured 0.072 (the std-0.3 dimension)


def test_ddim_matches_diffusers(noise):
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    ref.set_timesteps(8)
    x = noise[:64]
    for t in ref.timesteps:
        eps = gaussian_epsilon(x, torch.full((x.shape[0],), t.item() / 1000))
        x = ref.step(eps, t, x, eta=0.0).prev_sample
    assert torch.allclose(sample_ddim(gaussian_epsilon, noise[:64], 8, SCHEDULE), x, atol=1e-4)


def test_ddpm_ancestral_lands_on_the_gaussian(noise):
    torch.manual_seed(0)
    out = sample_ddim(gaussian_epsilon, noise[:4096], SCHEDULE.num_timesteps, SCHEDULE, eta=1.0)   # all 1000 steps
    assert (out.mean(0) - MU).abs().max() < 0.1               # measured 0.025-0.038 (seeds 0-2)
    assert ((out.var(0) / STD ** 2) - 1).abs().max() < 0.12    # measured 0.045-0.081


# ----------------------------------------------------------------------------- guidance

def conditional_model(calls):
    """Output depends on x, t, the label and dropout, so every branch is distinguishable."""
    def model(x, t, level=None, cond=None, drop=None):
        calls.append(dict(x=x.clone(), drop=drop, cond=cond))
        label = torch.zeros(x.shape[0]) if cond is None else cond.float()
        if drop is not None:
            label = torch.where(drop, torch.full_like(label, -3.0), label)
        return 0.5 * x + label.view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)
    return model


def test_cfg_scales():
    x = torch.randn(6, *SHAPE)
    t = torch.full((6,), 0.25)
    labels = torch.arange(6)
    calls = []
    model = conditional_model(calls)
    v_c = model(x, t, cond=labels, drop=torch.zeros(6, dtype=torch.bool))
    v_u = model(x, t, cond=labels, drop=torch.ones(6, dtype=torch.bool))
    calls.clear()
    assert torch.equal(guided(model, labels, 1.0)(x, t), v_c) and len(calls) == 1
    assert torch.equal(guided(model, labels, 0.0)(x, t), v_u) and len(calls) == 2
    calls.clear()
    out = guided(model, labels, 4.0)(x, t)
    assert torch.allclose(out, v_u + 4.0 * (v_c - v_u))
    (call,) = calls                                     # one doubled forward
    assert torch.equal(call["x"][:6], call["x"][6:])    # both branches see the same noise
    assert call["drop"].tolist() == [False] * 6 + [True] * 6
    assert torch.equal(call["cond"], labels.repeat(2))
    calls.clear()
    assert torch.equal(guided(model, None, 4.0)(x, t), model(x, t)) and calls[0]["cond"] is None


def test_cfg_passes_levels_and_checks_condition_rows():
    seen = []

    def model(x, t, level=None, cond=None, drop=None):
        seen.append(level)
        return x

    level = torch.full((3,), 2)
    guided(model, torch.arange(3), 2.0)(torch.zeros(3, *SHAPE), torch.zeros(3), level=level)
    assert seen[0].tolist() == [2] * 6


# ----------------------------------------------------------------------------- seeds

def test_same_seeds_same_samples_for_any_batch_split():
    seeds = [11, 12, 13, 14, 15, 16, 17]
    whole = initial_noise(seeds, SHAPE)
    parts = torch.cat([initial_noise(seeds[:2], SHAPE), initial_noise(seeds[2:], SHAPE)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole[0], initial_noise([99], SHAPE)[0])
    assert torch.equal(initial_noise([5], SHAPE)[0], torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)))

    def run(batch):
        return sample_ddim(gaussian_epsilon, initial_noise(batch, SHAPE), 10, SCHEDULE, eta=1.0,
                           generators=noise_generators(batch))

    split = torch.cat([run(seeds[:3]), run(seeds[3:])])
    assert torch.equal(run(seeds), split)
    assert not torch.equal(run(seeds), sample_ddim(gaussian_epsilon, whole, 10, SCHEDULE, eta=1.0,
                                                   generators=noise_generators([s + 1 for s in seeds])))
    euler = sample_euler(gaussian_velocity, whole, 4)
    assert torch.equal(torch.cat([sample_euler(gaussian_velocity, whole[:3], 4),
                                  sample_euler(gaussian_velocity, whole[3:], 4)]), euler)


def test_dispatcher(noise):
    """Each objective dispatches its samplers (the old name-only dispatcher is gone)."""
    x = noise[:16]
    flow, ddpm, shortcut_model = OBJECTIVES["flow"], OBJECTIVES["ddpm"], OBJECTIVES["shortcut"]
    assert torch.equal(flow.sample(FlowConfig(), "euler", gaussian_velocity, x, 4),
                       sample_euler(gaussian_velocity, x, 4))
    assert torch.equal(flow.sample(FlowConfig(), "heun", gaussian_velocity, x, 4),
                       sample_heun(gaussian_velocity, x, 4))
    assert torch.equal(ddpm.sample(DDPMConfig(), "ddim", gaussian_epsilon, x, 4),
                       sample_ddim(gaussian_epsilon, x, 4, SCHEDULE))
    shortcut = lambda x, t, level: gaussian_velocity(x, t)
    assert torch.equal(shortcut_model.sample(ShortcutConfig(), "shortcut", shortcut, x, 4),
                       sample_euler(gaussian_velocity, x, 4))
    generators = noise_generators(range(16))
    strided = ddpm.sample(DDPMConfig(), "ddpm", gaussian_epsilon, x, 50, generators=generators)
    assert torch.equal(strided, sample_ddim(gaussian_epsilon, x, 50, SCHEDULE, eta=1.0,
                                            generators=noise_generators(range(16))))
    # An unknown sampler name: refused by every objective's rule, which is asked before sampling.
    assert set(SAMPLERS) == {"shortcut", "meanflow", "euler", "heun", "ddim", "ddpm"}
    for name, objective in OBJECTIVES.items():
        assert f"sampler dpm does not fit a {name} model (use one of {', '.join(objective.samplers)})" in \
            objective.sampling_problem(objective.Config(), "dpm", 4)


def test_intrinsic_guidance_is_one_forward_with_the_scale_as_input():
    seen = []

    def model(x, t, level=None, cond=None, drop=None, guidance=None):
        seen.append(dict(drop=drop, guidance=guidance, rows=x.shape[0]))
        return x + guidance.view(-1, 1, 1, 1)

    x = torch.zeros(3, *SHAPE)
    out = guided(model, torch.arange(3), 2.5, intrinsic=True)(x, torch.zeros(3))
    assert torch.equal(out, torch.full_like(x, 2.5))
    (call,) = seen
    assert call["rows"] == 3 and call["drop"] is None and call["guidance"].tolist() == [2.5] * 3


def test_meanflow_sampler_steps_on_the_grid_with_the_interval_length():
    calls = []

    def fn(x, t, interval):
        calls.append((t[0].item(), interval[0].item()))
        return torch.ones_like(x)

    out = OBJECTIVES["meanflow"].sample(MeanFlowConfig(), "meanflow", fn, torch.zeros(2, *SHAPE), 4)
    assert calls == [(0.0, 0.25), (0.25, 0.25), (0.5, 0.25), (0.75, 0.25)]
    assert torch.allclose(out, torch.ones_like(out))     # four steps of length 1/4 at velocity 1
