"""Stage-1 losses: LPIPS weights file layout, adaptive GAN weight, hinge loss, gradient isolation."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from modules.core.vae_loss import (NLayerDiscriminator, VAELoss, VAELossConfig, adaptive_disc_weight,
                                   expected_lpips_shapes, hinge_d_loss)
from modules.interop.lpips import PerceptualWeightsError, convert_lpips_checkpoint, load_lpips, perceptual_network
from modules.interop.lpips import main as losses_main

CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
POOL_AFTER = (2, 7, 14, 21)          # conv indices followed by a 2x2 max-pool
TAP_AFTER = (2, 7, 14, 21, 28)       # conv indices whose ReLU output LPIPS compares


def random_lpips_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_lpips_shapes().items():
        if key.startswith("lin"):
            state[key] = torch.rand(shape, generator=g)     # trained LPIPS heads are non-negative
        elif key.endswith("weight"):
            fan_in = shape[1] * 9
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.01
    return state


def reference_lpips(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written functionally from the file's keys (a second implementation)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):
        h, out = (img - shift) / scale, []
        for idx in CONV_INDICES:
            h = F.relu(F.conv2d(h, state[f"features.{idx}.weight"], state[f"features.{idx}.bias"], padding=1))
            if idx in TAP_AFTER:
                out.append(h)
            if idx in POOL_AFTER:
                h = F.max_pool2d(h, 2)
        return out

    total = torch.zeros(x.shape[0])
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        total += F.conv2d((a - b) ** 2, state[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
    return total


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    state = random_lpips_state()
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg16.safetensors"
    save_file(state, str(path))
    return path, state


def images(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- LPIPS

def test_lpips_file_matches_a_functional_reference(lpips_file):
    path, state = lpips_file
    lpips = load_lpips(path)
    x, y = images(1), images(2)
    with torch.no_grad():
        same = lpips(x, x)
        diff = lpips(x, y)
    assert torch.equal(same, torch.zeros(2))
    assert (diff > 0).all()
    torch.testing.assert_close(diff, reference_lpips(state, x, y), rtol=1e-4, atol=1e-6)


def test_lpips_is_frozen(lpips_file):
    lpips = load_lpips(lpips_file[0])
    assert not any(p.requires_grad for p in lpips.parameters())
    y = images(2).requires_grad_(True)
    lpips(images(1), y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_lpips_missing_or_misshaped_keys_are_named(lpips_file, tmp_path):
    _, state = lpips_file
    broken = dict(state)
    del broken["lin3.model.1.weight"]
    broken["features.5.weight"] = torch.zeros(128, 64, 1, 1)
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(PerceptualWeightsError) as err:
        load_lpips(path)
    message = str(err.value)
    assert str(path) in message and "lin3.model.1.weight" in message and "features.5.weight" in message


def test_lpips_missing_file_and_pickle_are_refused(tmp_path):
    with pytest.raises(PerceptualWeightsError, match="nope.safetensors"):
        load_lpips(tmp_path / "nope.safetensors")
    pickle_file = tmp_path / "vgg.pth"
    torch.save({}, pickle_file)
    with pytest.raises(PerceptualWeightsError, match="only .safetensors"):
        load_lpips(pickle_file)


def official_style_states(state):
    """The two official files' layouts: torchvision vgg16 (with classifier) and lpips vgg.pth."""
    vgg = {k: v.clone() for k, v in state.items() if k.startswith("features.")}
    vgg["features.30.weight"] = torch.zeros(1)          # layers past relu5_3 are ignored ...
    vgg["classifier.0.weight"] = torch.zeros(4, 4)      # ... and so is the classifier
    heads = {k: v.clone() for k, v in state.items() if k.startswith("lin")}
    return vgg, heads


def test_convert_official_layout_round_trip(lpips_file, tmp_path):
    _, state = lpips_file
    vgg, heads = official_style_states(state)
    converted = convert_lpips_checkpoint(vgg, heads)
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)

    del heads["lin2.model.1.weight"]
    with pytest.raises(PerceptualWeightsError, match="lin2.model.1.weight"):
        convert_lpips_checkpoint(vgg, heads)


def test_convert_cli_writes_a_loadable_file(lpips_file, tmp_path, capsys):
    _, state = lpips_file
    vgg, heads = official_style_states(state)
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    out = tmp_path / "out" / "lpips_vgg16.safetensors"
    rc = losses_main(["convert", "--vgg", str(tmp_path / "vgg16.pth"), "--lpips", str(tmp_path / "vgg.pth"),
                      "--out", str(out)])
    assert rc == 0
    reloaded = load_file(str(out))
    assert all(torch.equal(reloaded[k], state[k]) for k in state)
    x, y = images(3), images(4)
    torch.testing.assert_close(load_lpips(out)(x, y), reference_lpips(state, x, y), rtol=1e-4, atol=1e-6)

    rc = losses_main(["convert", "--vgg", str(tmp_path / "missing.pth"), "--lpips", str(tmp_path / "vgg.pth"),
                      "--out", str(out)])
    assert rc == 2 and "missing.pth" in capsys.readouterr().err


# ----------------------------------------------------------------------------- discriminator

def test_discriminator_layout_and_init():
    torch.manual_seed(0)
    disc = NLayerDiscriminator(3, 64, 3)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    big = torch.cat([c.weight.flatten() for c in convs[1:4]])
    assert abs(big.std().item() - 0.02) < 1e-3 and abs(big.mean().item()) < 1e-3
    assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)   # taming's 30x30 patches at 256 px
    with pytest.raises(ValueError, match="at least 24x24"):
        disc(torch.zeros(1, 3, 16, 16))


# ----------------------------------------------------------------------------- adaptive weight

def test_adaptive_weight_equals_hand_computed_ratio():
    torch.manual_seed(0)
    z = torch.randn(5)
    target = torch.randn(3)
    weight = torch.randn(3, 5, requires_grad=True)      # toy linear decoder: recon = W z
    a = torch.randn(3)                                  # toy linear discriminator: logit = a . recon
    recon = weight @ z
    nll = (recon - target).abs().mean()
    g_loss = -(a * recon).sum()
    got = adaptive_disc_weight(nll, g_loss, weight, 0.5)
    # d nll / dW = sign(Wz - t) z^T / 3 and d g / dW = -a z^T, so the norms are products of vector norms.
    grad_nll = (torch.sign(recon - target).norm() / 3) * z.norm()
    grad_g = a.norm() * z.norm()
    expected = 0.5 * grad_nll / (grad_g + 1e-4)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-6, atol=0)
    assert not got.requires_grad
    assert weight.grad is None                          # the graph and .grad are left for backward


def test_adaptive_weight_is_clamped_and_checks_the_layer():
    w = torch.ones(2, 2, requires_grad=True)
    assert adaptive_disc_weight(100 * w.sum(), 0 * w.sum(), w, 0.5).item() == pytest.approx(0.5e4)
    other = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="last_layer_weight"):
        adaptive_disc_weight(w.sum(), w.sum(), other, 0.5)


# ----------------------------------------------------------------------------- VAELoss

class ToyPosterior:
    def __init__(self, mean: torch.Tensor):
        self.mean = mean

    def kl(self) -> torch.Tensor:
        return 0.5 * self.mean.pow(2).sum(dim=(1, 2, 3))


class ToyAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 3, padding=1)
        self.decoder = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        mean = self.encoder(x)
        return self.decoder(mean), ToyPosterior(mean)


def make_loss(disc_start: int = 10, perceptual_weights=None, perceptual_weight: float = 1.0) -> VAELoss:
    torch.manual_seed(0)
    cfg = VAELossConfig(disc_start=disc_start, disc_channels=8, disc_layers=3, kl_weight=1e-2,
                        perceptual_weight=perceptual_weight, perceptual_weights=perceptual_weights)
    return VAELoss(cfg, perceptual=perceptual_network(cfg))


def test_without_weights_perceptual_is_off_with_one_warning(caplog):
    torch.manual_seed(0)
    ae = ToyAutoencoder()
    x = images(5)
    with caplog.at_level(logging.WARNING, logger="modules.interop.lpips"):
        loss_fn = make_loss()
        recon, post = ae(x)
        loss, logs = loss_fn.generator_loss(x, recon, post, ae.decoder.weight, step=0)
        loss_fn.generator_loss(x, recon, post, ae.decoder.weight, step=1)
    warnings = [r for r in caplog.records if r.name == "modules.interop.lpips" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "perceptual" in warnings[0].getMessage()
    assert logs["loss_perceptual"].item() == 0.0
    expected = (x - recon).abs().mean() + 1e-2 * post.kl().mean() / x[0].numel()
    torch.testing.assert_close(loss, expected)


def test_generator_loss_sums_its_terms(lpips_file):
    torch.manual_seed(0)
    ae = ToyAutoencoder()
    loss_fn = make_loss(disc_start=0, perceptual_weights=str(lpips_file[0]), perceptual_weight=0.7)
    x = images(6)
    recon, post = ae(x)
    loss, logs = loss_fn.generator_loss(x, recon, post, ae.decoder.weight, step=0)
    assert set(logs) == {"loss_l1", "loss_perceptual", "loss_kl", "loss_g", "disc_weight"}
    assert all(not v.requires_grad and v.dim() == 0 for v in logs.values())

    l1 = (x - recon).abs().mean()
    p = reference_lpips(lpips_file[1], x, recon.detach()).mean()
    g = -loss_fn.discriminator(recon).mean()
    nll = l1 + 0.7 * loss_fn.perceptual(x, recon).mean()
    weight = adaptive_disc_weight(nll, g, ae.decoder.weight, 0.5)
    torch.testing.assert_close(logs["loss_perceptual"], p.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logs["disc_weight"], weight)
    torch.testing.assert_close(loss, l1 + 0.7 * p + 1e-2 * post.kl().mean() / x[0].numel() + weight * g, rtol=1e-4, atol=1e-6)
    assert weight.item() > 0


def test_generator_loss_rejects_a_kl_without_batch_shape():
    ae = ToyAutoencoder()
    x = images(7)
    recon, post = ae(x)
    post.kl = lambda: post.mean.pow(2).sum()
    with pytest.raises(ValueError, match=r"posterior.kl\(\) must return one value per sample"):
        make_loss().generator_loss(x, recon, post, ae.decoder.weight, step=0)


def test_discriminator_loss_before_start_is_zero_but_connected():
    loss_fn = make_loss(disc_start=10)
    x, r = images(8), images(9)
    loss, logs = loss_fn.discriminator_loss(x, r, step=9)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in loss_fn.discriminator.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    assert logs["loss_disc"].item() == 0.0


def test_discriminator_loss_after_start_is_the_hinge_value():
    loss_fn = make_loss(disc_start=10)
    x, r = images(8), images(9)
    loss, logs = loss_fn.discriminator_loss(x, r, step=10)
    with torch.no_grad():
        real = loss_fn.discriminator(x).numpy()
        fake = loss_fn.discriminator(r).numpy()
    expected = 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logs["logits_real"].item() == pytest.approx(real.mean(), rel=1e-5, abs=1e-7)
    assert logs["logits_fake"].item() == pytest.approx(fake.mean(), rel=1e-5, abs=1e-7)


def test_hinge_with_known_logits():
    class ChannelMean(nn.Module):            # logits = the image itself, so they are known
        def forward(self, x):
            return x.mean(dim=1, keepdim=True)

    loss_fn = make_loss(disc_start=0)
    loss_fn.discriminator = ChannelMean()
    real = torch.tensor([0.5, -1.5, 2.0, 0.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    fake = torch.tensor([-0.2, 1.0, -3.0, 0.25]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    loss, _ = loss_fn.discriminator_loss(real, fake, step=0)
    # real: relu(1 - [0.5, -1.5, 2, 0]) = [0.5, 2.5, 0, 1] -> 1.0
    # fake: relu(1 + [-0.2, 1, -3, 0.25]) = [0.8, 2, 0, 1.25] -> 1.0125
    assert loss.item() == pytest.approx(0.5 * (1.0 + 1.0125))
    assert hinge_d_loss(torch.tensor([2.0]), torch.tensor([-2.0])).item() == 0.0


def test_gradients_stay_on_their_own_side():
    torch.manual_seed(0)
    ae = ToyAutoencoder()
    loss_fn = make_loss(disc_start=0)
    x = images(10)
    recon, post = ae(x)

    d_loss, _ = loss_fn.discriminator_loss(x, recon, step=0)
    d_loss.backward()
    assert all(p.grad is None for p in ae.parameters())
    # (the last bias can get an exact 0: with all logits in (-1, 1) its hinge gradients cancel)
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in loss_fn.discriminator.named_parameters() if "weight" in n)

    loss_fn.discriminator.zero_grad(set_to_none=True)
    g_loss, logs = loss_fn.generator_loss(x, recon, post, ae.decoder.weight, step=0)
    assert logs["disc_weight"].item() > 0
    g_loss.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ae.parameters())

    # The adversarial term reaches the decoder: its gradient differs from the loss without it.
    ae.zero_grad(set_to_none=True)
    recon, post = ae(x)
    loss_fn.generator_loss(x, recon, post, ae.decoder.weight, step=-1)[0].backward()
    without_gan = ae.decoder.weight.grad.clone()
    ae.zero_grad(set_to_none=True)
    recon, post = ae(x)
    loss_fn.generator_loss(x, recon, post, ae.decoder.weight, step=0)[0].backward()
    assert not torch.allclose(ae.decoder.weight.grad, without_gan)


def test_ddp_wrapped_discriminator_trains_for_two_steps(tmp_path):
    """The trainer swaps in the DDP-wrapped discriminator; no unused-parameter or reduction errors."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ae = DDP(ToyAutoencoder())
        loss_fn = make_loss(disc_start=1)
        loss_fn.discriminator = DDP(loss_fn.discriminator)
        opt_g = torch.optim.Adam(ae.parameters())
        opt_d = torch.optim.Adam(loss_fn.discriminator.parameters())
        x = images(11)
        for step in range(3):
            recon, post = ae(x)
            g_loss, _ = loss_fn.generator_loss(x, recon, post, ae.module.decoder.weight, step)
            g_loss.backward()
            d_loss, _ = loss_fn.discriminator_loss(x, recon.detach(), step)
            d_loss.backward()
            assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
            opt_g.step()
            opt_d.step()
            opt_g.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()
