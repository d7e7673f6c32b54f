"""The training objectives of the stage-2 network, one file each, and their one registry.

``OBJECTIVES`` is the only place an objective is looked up by name (``objective=...`` in a run
config, the samplers an export accepts, the step counts evaluation uses). A new objective is one
file (a subclass of :class:`modules.core.objectives.base.Objective` with its config section) and
one line here; the run config gets its section from this registry.
"""
from __future__ import annotations

from typing import Optional

from modules.core.objectives.base import Objective, Teacher
from modules.core.objectives.ddpm import DDPM
from modules.core.objectives.flow import Flow
from modules.core.objectives.imf import Imf
from modules.core.objectives.meanflow import MeanFlow
from modules.core.objectives.shortcut import Shortcut

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (Shortcut, Flow, MeanFlow, DDPM, Imf)}
SAMPLERS = tuple(sorted({sampler for cls in OBJECTIVES.values() for sampler in cls.samplers}))


def objective_class(name: str) -> type[Objective]:
    """The objective called ``name``; an unknown name is an error naming the known ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective {name!r} is not one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def build_objective(name: str, cfg, cond_drop: float = 0.0, teacher: Optional[Teacher] = None) -> Objective:
    """The objective ``name`` with its config section ``cfg``; ``teacher`` runs its teacher (None: the online
    network teaches, for objectives with one)."""
    return objective_class(name)(cfg, cond_drop, teacher)
