"""What torch.compile does to the toolkit: the backend it uses, and the names its wrapper gives to weights.

One environment variable, ``LDM_COMPILE_BACKEND`` (e.g. ``aot_eager``: machines without a compiler,
and the tests, where inductor takes minutes on a CPU), picks the backend of training's compile
(``train.compile``) and of sampling's (``sample.py --compile``); unset, inductor. A compiled
module's wrapper puts ``_orig_mod.`` before every parameter name: state dicts are saved under the
network's own names, and files written with the prefix read as if without it.
"""
from __future__ import annotations

import os
from typing import Any

COMPILE_BACKEND_ENV = "LDM_COMPILE_BACKEND"
COMPILED_PREFIX = "_orig_mod."     # what torch.compile's wrapper puts before every name


def compile_backend() -> dict[str, Any]:
    """``{"backend": ...}`` when ``$LDM_COMPILE_BACKEND`` names one, else ``{}`` (inductor)."""
    backend = os.environ.get(COMPILE_BACKEND_ENV)
    return {"backend": backend} if backend else {}


def sampling_options() -> dict[str, Any]:
    """torch.compile's arguments for sampling: mode="reduce-overhead" (inductor; CUDA graphs on GPUs), or the
    chosen backend. Static shapes: one graph per batch size (sampling sees one, plus a smaller last batch),
    which CUDA graphs replay fastest."""
    return {"dynamic": False, **(compile_backend() or {"mode": "reduce-overhead"})}


def without_compiled_prefix(tensors: dict) -> dict:
    """Names as the network has them: files that earlier compiled runs wrote hold ``_orig_mod.`` names."""
    return {key.replace(COMPILED_PREFIX, ""): value for key, value in tensors.items()}
