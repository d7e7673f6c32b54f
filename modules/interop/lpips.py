"""LPIPS-VGG16 weights, other people's: torchvision's VGG16 and the ``lpips`` package's v0.1 heads.

The perceptual loss (modules/core/vae_loss.py) reads its weights only from a local
``.safetensors`` file whose keys are

* ``features.N.weight`` / ``features.N.bias`` for the 13 convolutions of torchvision's
  ``vgg16().features`` (N in 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), and
* ``lin0.model.1.weight`` .. ``lin4.model.1.weight`` (shapes [1, C, 1, 1], C = 64, 128,
  256, 512, 512): the LPIPS v0.1 linear heads, named as in the ``lpips`` package's
  ``weights/v0.1/vgg.pth``.

To build that file from the official downloads (torchvision's ``vgg16-397923af.pth`` and
lpips' ``vgg.pth``)::

    python -m modules.interop.lpips convert --vgg vgg16-397923af.pth --lpips vgg.pth \\
        --out lpips_vgg16.safetensors

and set ``loss.perceptual_weights=lpips_vgg16.safetensors``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from modules.core.vae_loss import LPIPS, VAELossConfig, expected_lpips_shapes
from modules.errors import UserError
from modules.run.export import read_weights

logger = logging.getLogger(__name__)


class PerceptualWeightsError(UserError, ValueError):
    """A perceptual-loss weights file that is missing, unreadable or of the wrong layout."""


def load_lpips(path: str | Path) -> LPIPS:
    """The LPIPS network with the weights of a file built by ``convert`` (safetensors only)."""
    path = Path(path)
    if not path.is_file():
        raise PerceptualWeightsError(
            f"perceptual weights file {path} not found; build it with `python -m modules.interop.lpips "
            "convert --vgg vgg16-397923af.pth --lpips vgg.pth --out lpips_vgg16.safetensors` "
            "or set loss.perceptual_weights=null to train without the perceptual loss")
    state = read_weights(path, PerceptualWeightsError)
    model = LPIPS()
    _check_layout(state, expected_lpips_shapes(), str(path))
    model.load_state_dict(state)
    return model


def perceptual_network(cfg: VAELossConfig) -> Optional[LPIPS]:
    """The perceptual loss's network for ``loss.*`` (None: no perceptual term, with a warning when one
    was asked for without weights)."""
    if cfg.perceptual_weight <= 0:
        return None
    if not cfg.perceptual_weights:
        logger.warning("loss.perceptual_weights is not set: training without the perceptual "
                       "(LPIPS) loss; see modules/interop/lpips.py to build the weights file")
        return None
    return load_lpips(cfg.perceptual_weights)


def _check_layout(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:10])}"
                        + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    if wrong:
        problems.append(f"wrong shapes: {', '.join(wrong)}")
    if problems:
        raise PerceptualWeightsError(f"{source}: not an LPIPS-VGG16 weights file ({'; '.join(problems)}); "
                                     "see modules/interop/lpips.py for the expected layout")


def convert_lpips_checkpoint(torchvision_vgg_state: dict[str, torch.Tensor],
                             lpips_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge torchvision's ``vgg16`` state dict and lpips' ``vgg.pth`` heads into this module's layout.

    Takes already-loaded state dicts; the classifier and the convolutions past relu5_3 are dropped.
    lpips heads saved without dropout (``linK.model.0.weight``) are accepted as well.
    """
    expected = expected_lpips_shapes()
    out: dict[str, torch.Tensor] = {}
    for key in expected:
        if key.startswith("features."):
            if key not in torchvision_vgg_state:
                raise PerceptualWeightsError(f"VGG16 state dict: missing key {key} (expected torchvision's "
                                             "vgg16 layout, e.g. vgg16-397923af.pth)")
            out[key] = torchvision_vgg_state[key]
        else:
            head = key.split(".", 1)[0]
            candidates = [f"{head}.model.1.weight", f"{head}.model.0.weight"]
            found = next((c for c in candidates if c in lpips_state), None)
            if found is None:
                raise PerceptualWeightsError(f"LPIPS state dict: missing key {candidates[0]} (expected the "
                                             "lpips package's weights/v0.1/vgg.pth layout)")
            out[key] = lpips_state[found]
    out = {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}
    _check_layout(out, expected, "converted LPIPS weights")
    return out


# ----------------------------------------------------------------------------- converter CLI

def _load_official(path: str) -> dict[str, torch.Tensor]:
    file = Path(path)
    if not file.is_file():
        raise PerceptualWeightsError(f"{file}: file not found")
    try:
        # The user names these official files; weights_only refuses anything but tensors.
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise PerceptualWeightsError(f"{file}: cannot be read as a PyTorch state dict ({e})") from None
    if not isinstance(state, dict):
        raise PerceptualWeightsError(f"{file}: holds a {type(state).__name__}, expected a state dict")
    return state


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modules.interop.lpips",
                                     description="Build the LPIPS-VGG16 .safetensors file the VAE loss reads.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="merge torchvision vgg16 + lpips vgg.pth into one safetensors file")
    conv.add_argument("--vgg", required=True, help="torchvision vgg16 weights, e.g. vgg16-397923af.pth")
    conv.add_argument("--lpips", required=True, help="lpips v0.1 heads: lpips/weights/v0.1/vgg.pth")
    conv.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        if out.suffix != ".safetensors":
            raise PerceptualWeightsError(f"--out {out}: must end in .safetensors")
        state = convert_lpips_checkpoint(_load_official(args.vgg), _load_official(args.lpips))
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out))
    except PerceptualWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(state)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
