"""Checks shared by the library's entry points: each error names the argument, the bad value and the fix.

Kept in one place so that "an int, not a bool" or "class indices in range" means the same everywhere, and
a module's own guards only say what is particular to it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from hookmix.core.errors import UsageError

__all__ = [
    "UsageError",
    "check_alpha",
    "check_class_indices",
    "check_int",
    "check_probability",
    "is_int",
    "is_number",
    "modes_restored",
]


def is_int(value: Any, minimum: int | None = None) -> bool:
    """Whether ``value`` is an int — a bool is not, though Python says so — and at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int, note: str = "") -> int:
    """``value`` when :func:`is_int` with ``minimum``; else ``ValueError("{name}=... must be an int >= N{note}.")``."""
    if not is_int(value, minimum):
        raise UsageError(f"{name}={value!r} must be an int >= {minimum}{note}.")
    return value


def check_probability(name: str, value: Any) -> float:
    """``value`` as a float when it is a number in [0, 1]."""
    if not is_number(value):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__} {value!r}.")
    if not 0.0 <= float(value) <= 1.0:
        raise UsageError(f"{name}={value!r} is outside [0, 1]; use e.g. {name}=1.0 to mix every step.")
    return float(value)


def check_alpha(alpha: Any, argument: str = "alpha", allow_zero: bool = False) -> float:
    """Validate a Beta(α, α) concentration: a finite number > 0 (or exactly 0 = off, when allowed)."""
    if not is_number(alpha):
        raise TypeError(f"{argument} must be a positive number, got {type(alpha).__name__} {alpha!r}.")
    if not math.isfinite(alpha) or alpha < 0 or (alpha == 0 and not allow_zero):
        raise UsageError(
            f"{argument}={alpha!r} must be a finite number > 0 (λ ~ Beta({argument}, {argument})); "
            "alpha=0.4 is a good default, lower values keep one sample dominant."
        )
    return float(alpha)


def check_class_indices(y: torch.Tensor, num_classes: int | None, name: str, fix: str) -> tuple[int, int]:
    """The smallest and largest class index in ``y`` (one host synchronisation); a ``ValueError`` naming
    ``name``, the values found, the valid range and ``fix`` when one is negative or ``>= num_classes``."""
    low, high = (int(v) for v in torch.stack([y.min(), y.max()]).tolist())
    if low < 0 or (num_classes is not None and high >= num_classes):
        valid = f">= 0 and below num_classes={num_classes}, i.e. in [0, {num_classes - 1}]" if num_classes else ">= 0"
        raise UsageError(
            f"{name} must hold class indices {valid}, got values in [{low}, {high}] (it contains "
            f"{low if low < 0 else high}); {fix}."
        )
    return low, high


@contextmanager
def modes_restored(model: nn.Module, training: bool | None = None) -> Iterator[None]:
    """Optionally ``model.train(training)`` for the block; restore every submodule's own ``training``
    flag on exit (``model.train(was_training)`` would overwrite mixed modes such as a linear probe's)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        if training is not None:
            model.train(training)
        yield
    finally:
        for module, mode in modes:
            module.training = mode
