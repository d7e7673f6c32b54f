"""Exponential moving average of a model's trainable parameters, without a second model copy.

The shadow is an fp32 tensor per parameter that requires grad, keyed by the name
``model.named_parameters()`` gives. It mirrors whatever those parameters are: full tensors
(single process, DDP: identical on every rank) or the local shard (FSDP flat parameters,
DTensor shards), so each rank keeps and saves only its own part. ``swapped`` puts the shadow
into the model in place for teacher forwards and exports, then restores the originals
bit-exactly. Buffers are not averaged. DeepSpeed ZeRO stage 3 (parameters partitioned
outside ``named_parameters``) is refused; stages 1 and 2 keep full parameters and work.
"""
from __future__ import annotations

import sys
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Callable, Iterator, Optional

import torch
from torch import nn

SHADOW_PREFIX = "shadow."
COUNT_KEY = "num_updates"


def _release_gathered(model: nn.Module) -> None:
    """Free the full-size parameters FSDP keeps after a forward, so shard writes take effect.

    FSDP1 and FSDP2 keep the root module's all-gathered parameters after a forward and
    reuse them in the next forward without gathering again; after writing into the shards
    (swap in or out) the next forward would silently run on the old values. FSDP2 has a
    public ``reshard``; FSDP1 only its internal ``_reshard`` (what its own backward calls).
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:   # nothing is FSDP-wrapped unless FSDP was imported (importing it costs 1.3 s)
        return
    from torch.distributed.fsdp._runtime_utils import _reshard as fsdp1_reshard
    fsdp2_module = getattr(fsdp, "FSDPModule", None)
    for module in model.modules():
        if fsdp2_module is not None and isinstance(module, fsdp2_module):
            module.reshard()
        elif isinstance(module, fsdp.FullyShardedDataParallel):
            handle = module._handle
            gathered = (handle is not None and handle.uses_sharded_strategy
                        and hasattr(handle.flat_param, "_full_param_padded") and not handle.needs_unshard())
            if gathered:
                fsdp1_reshard(module, handle, True)


def _local(p: torch.Tensor) -> torch.Tensor:
    # DTensor (FSDP2) parameters: the EMA works on this rank's shard.
    return p.to_local() if hasattr(p, "to_local") else p


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


class EMA:
    """decay at update n (n = updates done so far) = min(decay, (1 + n) / (10 + n)) with warmup.

    The update count lives on the device with the shadow, so an update that a bad training step
    must skip (``update(model, finite)``) is skipped there, without the host reading the flag.

    ``model`` is the module whose parameters are mirrored (``accelerator.unwrap_model``'s
    result); ``root`` is the outermost wrapper around it, when there is one (what
    ``accelerator.prepare`` returned): FSDP keeps the root unit's gathered parameters there, so
    that is where they must be released before the shards are read or written.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, root: Optional[nn.Module] = None):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.root = root
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                name: _local(p).detach().float().clone() for name, p in self._named(model).items()}
        if not self.shadow:
            raise ValueError("EMA: the model has no parameters that require grad")
        self.count = torch.zeros((), dtype=torch.long, device=next(iter(self.shadow.values())).device)

    def _named(self, model: nn.Module) -> dict[str, torch.Tensor]:
        _release_gathered(self.root if self.root is not None else model)
        named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        partitioned = [name for name, p in named.items() if hasattr(p, "ds_tensor")]
        if partitioned:
            raise ValueError(f"EMA: parameters [{_preview(partitioned)}] are partitioned by DeepSpeed ZeRO stage 3, "
                             "which this EMA does not support; use ZeRO stage 1/2, DDP or FSDP")
        return named

    def _matched(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(shadow, local parameter) pairs in shadow order; a mismatch is a clear error."""
        params = self._named(model)
        missing = [n for n in self.shadow if n not in params]
        unexpected = [n for n in params if n not in self.shadow]
        if missing or unexpected:
            raise ValueError(f"EMA: the model's trainable parameters do not match the shadow "
                             f"(missing in model: [{_preview(missing)}]; not in shadow: [{_preview(unexpected)}])")
        pairs = []
        for name, shadow in self.shadow.items():
            local = _local(params[name])
            if local.shape != shadow.shape:
                raise ValueError(f"EMA: parameter '{name}' has shape {tuple(local.shape)}, "
                                 f"the shadow {tuple(shadow.shape)}")
            if shadow.device != local.device:
                # The model was moved (e.g. by accelerator.prepare) after the EMA was built.
                shadow = self.shadow[name] = shadow.to(local.device)
            pairs.append((shadow, local))
        return pairs

    @property
    def num_updates(self) -> int:
        """Updates done so far (a host read: for checks and reports, not the training loop)."""
        return int(self.count)

    def _decay(self) -> torch.Tensor:
        n = self.count.float()
        if self.warmup:
            return ((1 + n) / (10 + n)).clamp(max=self.decay)
        return torch.full_like(n, self.decay)

    def _weight(self) -> torch.Tensor:
        """What the next update gives the current weights: 1 - decay."""
        return 1.0 - self._decay()

    def current_decay(self) -> float:
        """The decay the next update will use (a host read)."""
        return float(self._decay())

    @torch.no_grad()
    def update(self, model: nn.Module, finite: Optional[torch.Tensor] = None) -> None:
        """shadow <- decay shadow + (1 - decay) weights; ``finite`` (a 0-d bool tensor) False leaves the
        shadow and the count as they were, bit for bit (the training step was skipped)."""
        pairs = self._matched(model)
        shadows = [s for s, _ in pairs]
        self.count = self.count.to(shadows[0].device)
        weight = self._weight()
        if finite is not None:
            weight = weight * finite
        # s (1 - w) + p w with a tensor w: exact at w = 0 (skipped) and at w = 1 (decay 0)
        torch._foreach_mul_(shadows, 1.0 - weight)
        torch._foreach_add_(shadows, torch._foreach_mul([p.float() for _, p in pairs], weight))
        self.count += 1 if finite is None else finite

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model holds the shadow weights inside the block and its own weights after it.

        No optimizer step may happen inside: the originals are restored from a backup.
        """
        with torch.no_grad():
            pairs = self._matched(model)
            backup = [local.detach().clone() for _, local in pairs]
            for shadow, local in pairs:
                local.copy_(shadow)
        try:
            yield model
        finally:
            with torch.no_grad():
                _release_gathered(self.root if self.root is not None else model)
                for (_, local), original in zip(pairs, backup):
                    local.copy_(original)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {SHADOW_PREFIX + name: t for name, t in self.shadow.items()}
        out[COUNT_KEY] = self.count.clone()
        return out

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        expected = {SHADOW_PREFIX + name for name in self.shadow} | {COUNT_KEY}
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(f"EMA state dict does not match the model (missing keys: [{_preview(missing)}]; "
                             f"unexpected keys: [{_preview(unexpected)}])")
        for name, shadow in self.shadow.items():
            value = state_dict[SHADOW_PREFIX + name]
            if tuple(value.shape) != tuple(shadow.shape):
                raise ValueError(f"EMA state dict: '{SHADOW_PREFIX}{name}' has shape {tuple(value.shape)}, "
                                 f"expected {tuple(shadow.shape)}")
        with torch.no_grad():
            for name, shadow in self.shadow.items():
                shadow.copy_(state_dict[SHADOW_PREFIX + name])
        self.count = torch.as_tensor(state_dict[COUNT_KEY], dtype=torch.long).to(self.count.device).clone()


# ----------------------------------------------------------------------------- the shortcut teacher

def teacher(model: nn.Module, owner: nn.Module, ema: Optional[EMA]) -> Callable[[], AbstractContextManager]:
    """The shortcut objective's teacher: ``model`` in eval mode (no dropout noise in the bootstrap
    targets, as the official code's ``train=False``), with ``ema``'s weights swapped in when given
    (``owner``: the module the EMA mirrors); None: the online weights teach."""
    @contextmanager
    def weights() -> Iterator[nn.Module]:
        was_training = model.training
        model.eval()
        try:
            with ema.swapped(owner) if ema is not None else nullcontext():
                yield model
        finally:
            model.train(was_training)
    return weights
