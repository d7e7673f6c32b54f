"""Stage-1 (KL-VAE) training losses: L1 + LPIPS perceptual + KL + adaptive-weight PatchGAN.

The recipe follows SD's ``LPIPSWithDiscriminator`` (taming-transformers): reconstruction
loss ``nll = L1 + perceptual_weight * LPIPS``, plus ``kl_weight * KL``, plus, from step
``disc_start``, a hinge-loss PatchGAN whose generator term is scaled by
``disc_weight * ||grad nll|| / ||grad g_loss||`` measured at the decoder's last layer.

The LPIPS network's weights (VGG16 and the LPIPS v0.1 heads, other people's) are read and
converted by modules/interop/lpips.py; :func:`expected_lpips_shapes` is their layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.core.settings import at_most, non_negative, positive, setting

WIDTH_LIMIT = 8192


@dataclass
class VAELossConfig:
    kl_weight: float = setting(1e-6, non_negative)
    perceptual_weight: float = setting(1.0, non_negative)
    perceptual_weights: Optional[str] = None           # local VGG16/LPIPS weights; None disables
    disc_start: int = setting(50_001, non_negative)
    disc_weight: float = setting(0.5, non_negative)
    disc_layers: int = setting(3, positive, at_most(8))
    disc_channels: int = setting(64, positive, at_most(WIDTH_LIMIT))
    disc_lr: float = setting(4.5e-6, positive)

# torchvision vgg16().features up to relu5_3: conv widths, "M" = 2x2 max-pool.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in ``features`` of the ReLUs LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_LPIPS_TAPS = (3, 8, 15, 22, 29)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# ImageNet mean/std expressed for [-1, 1] inputs: shift = 2 * mean - 1, scale = 2 * std.
_IMAGENET_SHIFT = (-0.030, -0.088, -0.188)
_IMAGENET_SCALE = (0.458, 0.448, 0.450)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_ch = item
    return nn.Sequential(*layers)


class _LinearHead(nn.Module):
    """LPIPS 1x1 head; ``model.1`` keeps the lpips key name (its slot 0 is a dropout, inert in eval)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def expected_lpips_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the perceptual weights file (see the module docstring)."""
    shapes: dict[str, tuple[int, ...]] = {}
    index, in_ch = 0, 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            index += 1
            continue
        shapes[f"features.{index}.weight"] = (item, in_ch, 3, 3)
        shapes[f"features.{index}.bias"] = (item,)
        index, in_ch = index + 2, item
    for i, ch in enumerate(_LPIPS_CHANNELS):
        shapes[f"lin{i}.model.1.weight"] = (1, ch, 1, 1)
    return shapes


class LPIPS(nn.Module):
    """LPIPS (v0.1, VGG16) distance between images in [-1, 1]; frozen, returns one value per image."""

    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()[: _LPIPS_TAPS[-1] + 1]
        for i, ch in enumerate(_LPIPS_CHANNELS):
            self.add_module(f"lin{i}", _LinearHead(ch))
        self.register_buffer("shift", torch.tensor(_IMAGENET_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_IMAGENET_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _LPIPS_TAPS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for i, (fx, fy) in enumerate(zip(self._taps(x), self._taps(y))):
            # Unit-normalise in float32: LPIPS' eps (1e-10) underflows to 0 in fp16.
            diff = (_unit_normalise(fx.float()) - _unit_normalise(fy.float())) ** 2
            head = getattr(self, f"lin{i}")
            total = total + head(diff.to(fx.dtype)).float().mean(dim=(1, 2, 3))
        return total


def _unit_normalise(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


# ----------------------------------------------------------------------------- discriminator

class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming-transformers layout), one logit per patch.

    GroupNorm replaces taming's BatchNorm: BatchNorm's batch statistics differ per DDP rank
    (or need SyncBatchNorm), depend on the micro-batch size under gradient accumulation, and
    make the generator step (fakes only) normalise differently from the discriminator step.
    """

    def __init__(self, in_ch: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"NLayerDiscriminator: layers must be >= 1, got {layers}")
        self.layers = layers
        seq: list[nn.Module] = [nn.Conv2d(in_ch, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            width = channels * mult
            seq += [nn.Conv2d(channels * prev, width, 4, stride=stride, padding=1, bias=False),
                    nn.GroupNorm(_groups(width), width), nn.LeakyReLU(0.2)]
        seq.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def min_input_size(self) -> int:
        # ``layers`` halvings, then two 4x4 stride-1 convs each remove one pixel.
        return 3 * 2 ** self.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"NLayerDiscriminator({self.layers} layers) needs images of at least "
                             f"{self.min_input_size}x{self.min_input_size}, got {tuple(x.shape[-2:])}")
        return self.main(x)


def _groups(channels: int, max_groups: int = 32) -> int:
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return g


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss, 0.5 * (mean relu(1 - real) + mean relu(1 + fake)) as in taming."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_disc_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                         disc_weight: float) -> torch.Tensor:
    """``disc_weight * clamp(||d nll / dW|| / (||d g / dW|| + 1e-4), 0, 1e4)``, detached.

    W is the decoder's last conv weight. The gradients come from the losses passed in, i.e.
    the current micro-batch under gradient accumulation (and the local batch under DDP: no
    all-reduce is involved, ``autograd.grad`` does not trigger DDP's gradient hooks).
    """
    nll_grad, = torch.autograd.grad(nll_loss, last_layer_weight, retain_graph=True, allow_unused=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True, allow_unused=True)
    if nll_grad is None or g_grad is None:
        raise ValueError("adaptive_disc_weight: last_layer_weight is not in the graph of both losses; "
                         "pass the decoder's final conv weight (the one producing the reconstructions)")
    ratio = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return torch.clamp(ratio, 0.0, 1e4).detach() * disc_weight


def _logits_without_param_grads(discriminator: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Discriminator logits that pass gradients to ``x`` only, never to the discriminator.

    Runs the plain module (outside any DDP wrapper) with detached parameters, so the
    generator's backward neither writes discriminator gradients nor triggers DDP hooks.
    This needs the full parameters locally: under FSDP / ZeRO-3 the discriminator (2.8M
    parameters at the defaults) must not be sharded.
    """
    module = getattr(discriminator, "_orig_mod", discriminator)     # torch.compile's wrapper
    module = getattr(module, "module", module)                          # DDP's
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


# ----------------------------------------------------------------------------- full loss

class VAELoss(nn.Module):
    """Generator and discriminator losses of the KL-VAE.

    ``self.discriminator`` is a submodule so the trainer can give it its own optimizer (and
    may replace it by its ``accelerator.prepare``-wrapped version). The LPIPS network, when
    enabled, is frozen and excluded from optimisation.

    Scale: L1 is a mean over pixels (so the loss and gradient norms do not grow with the
    image size), and the KL term is divided by the number of image values C * H * W to keep
    SD's balance: SD sums L1 over pixels and adds ``kl_weight`` times the KL summed over
    latent dims, so ``kl_weight = 1e-6`` means the same trade-off here as in SD.
    """

    def __init__(self, config: VAELossConfig, in_channels: int = 3, perceptual: Optional[LPIPS] = None):
        """``perceptual``: the loaded LPIPS network (modules/interop/lpips.py), None: no perceptual term."""
        super().__init__()
        self.config = config
        self.perceptual = perceptual if config.perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(in_channels, config.disc_channels, config.disc_layers)

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posterior,
                       last_layer_weight: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for the autoencoder's optimizer, and its detached parts for logging.

        ``posterior.kl()`` must return the per-sample KL summed over latent dims, shape [B].
        The adaptive GAN weight is measured on this call's (micro-)batch, so under
        ``accelerator.accumulate`` each micro-step uses its own weight. Without autograd
        (evaluation), the adversarial weight is reported as 0.
        """
        cfg = self.config
        l1 = (inputs - reconstructions).abs().mean()
        if self.perceptual is not None:
            perceptual = self.perceptual(inputs.contiguous(), reconstructions.contiguous()).mean()
        else:
            perceptual = torch.zeros((), device=inputs.device)
        nll = l1 + cfg.perceptual_weight * perceptual
        kl_per_sample = posterior.kl()
        if kl_per_sample.dim() != 1 or kl_per_sample.shape[0] != inputs.shape[0]:
            raise ValueError(f"posterior.kl() must return one value per sample (shape [{inputs.shape[0]}]), "
                             f"got shape {tuple(kl_per_sample.shape)}")
        kl = kl_per_sample.mean()
        loss = nll + cfg.kl_weight * kl / inputs[0].numel()
        g_loss = torch.zeros((), device=inputs.device)
        weight = torch.zeros((), device=inputs.device)
        if step >= cfg.disc_start:
            g_loss = generator_adversarial_loss(_logits_without_param_grads(self.discriminator, reconstructions))
            if torch.is_grad_enabled() and g_loss.requires_grad:
                weight = adaptive_disc_weight(nll, g_loss, last_layer_weight, cfg.disc_weight)
            loss = loss + weight * g_loss
        logs = {"loss_l1": l1, "loss_perceptual": perceptual, "loss_kl": kl, "loss_g": g_loss,
                "disc_weight": weight}
        return loss, {k: v.detach().float() for k, v in logs.items()}

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss for the discriminator's optimizer; inputs are detached here.

        Before ``disc_start`` the loss is the hinge value times 0: zero, yet still connected
        to every discriminator parameter, so DDP sees all of them used.
        """
        n = inputs.shape[0]
        logits = self.discriminator(torch.cat([inputs.detach(), reconstructions.detach()]))
        logits_real, logits_fake = logits[:n], logits[n:]
        factor = 1.0 if step >= self.config.disc_start else 0.0
        loss = factor * hinge_d_loss(logits_real, logits_fake)
        logs = {"loss_disc": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {k: v.detach().float() for k, v in logs.items()}
