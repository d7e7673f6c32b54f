"""The rules a config field obeys: ``setting(default, rule, ...)`` and the rule vocabulary.

A rule maps a value to what is wrong with it, or None. Every config section (a network's, an
objective's, the run's in modules/config/) declares its fields with their rules;
:func:`modules.config.io.validate` applies them, naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Callable, Optional

from modules.errors import ConfigError

Rule = Callable[[Any], Optional[str]]   # value -> what is wrong with it, or None


def setting(default: Any, *rules: Rule) -> Any:
    """A dataclass field with a default and the rules its value must pass."""
    return field(default=default, metadata={"rules": rules})


def field_rules(f: dataclasses.Field) -> tuple[Rule, ...]:
    return f.metadata.get("rules", ())


def positive(v) -> Optional[str]:
    return None if v > 0 else f"must be > 0, got {v!r}"


def non_negative(v) -> Optional[str]:
    return None if v >= 0 else f"must be >= 0, got {v!r}"


def at_least(limit: float) -> Rule:
    return lambda v: None if v >= limit else f"must be >= {limit}, got {v!r}"


def at_most(limit: float) -> Rule:
    """A sanity bound: values above it are typos (or a 100 GB allocation), not settings."""
    return lambda v: None if v <= limit else f"must be <= {limit}, got {v!r}"


def fraction(*, low_open: bool = False, high_open: bool = False) -> Rule:
    low, high = "(" if low_open else "[", ")" if high_open else "]"

    def rule(v) -> Optional[str]:
        ok = (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
        return None if ok else f"must be in {low}0, 1{high}, got {v!r}"
    return rule


def one_of(*choices) -> Rule:
    return lambda v: None if v in choices else f"{v!r} is not one of {', '.join(map(str, choices))}"


def is_power_of_two(n: int) -> bool:
    """The one definition of the power-of-two rule (step counts, M, downsampling factors)."""
    return n >= 1 and n & (n - 1) == 0


def power_of_two(v) -> Optional[str]:
    return None if is_power_of_two(v) else f"must be a power of two, got {v!r}"


def non_empty(v) -> Optional[str]:
    return None if len(v) else "needs at least one entry"


def each(*rules: Rule) -> Rule:
    """Apply ``rules`` to every entry of a tuple."""
    def rule(values) -> Optional[str]:
        return next((problem for v in values for r in rules if (problem := r(v))), None)
    return rule


def time_interval(v) -> Optional[str]:
    """Two flow times ``(low, high)``, 0 <= low < high <= 1."""
    ok = len(v) == 2 and 0 <= v[0] < v[1] <= 1
    return None if ok else f"must be two times 0 <= low < high <= 1, got {v!r}"


def scale_range(v) -> Optional[str]:
    """Two guidance scales ``(low, high)``, 0 <= low <= high <= 100."""
    ok = len(v) == 2 and 0 <= v[0] <= v[1] <= 100
    return None if ok else f"must be two guidance scales 0 <= low <= high <= 100, got {v!r}"


def fail(key: str, problem: str) -> ConfigError:
    return ConfigError(f"config key '{key}': {problem}")


def check_widths(prefix: str, base: int, mult: tuple[int, ...], groups: int) -> None:
    """Every level's width (``base`` x each of ``mult``) must split into ``groups`` GroupNorm groups."""
    for m in mult:
        if (base * m) % groups:
            raise fail(f"{prefix}base_channels", f"{base} x {m} is not divisible by {prefix}norm_groups={groups}")
