"""MixSettings: how a mixer mixes, in one frozen object that checks itself when built.

The same settings travel from the command line, :class:`~hookmix.FitConfig` and the integrations to the
:class:`~hookmix.mixing.plan.PlanSampler` that draws the plans, so a new setting is added here once. Settings that
need the model or the data — the layers, ``num_classes``, ``layout`` — stay with
:class:`~hookmix.HookMixer`, which takes a ``MixSettings`` (``settings=``) or builds one from its keywords.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from hookmix.core.checks import check_alpha, check_int, check_probability, is_int, is_number
from hookmix.core.errors import UsageError

__all__ = ["LAM_MODES", "MODES", "MixSettings"]

LAM_MODES = ("batch", "sample")
MODES = ("one", "all")


@dataclass(frozen=True)
class MixSettings:
    """How each training step mixes.

    Attributes:
        alpha: mixup λ ~ Beta(alpha, alpha); 0.4 keeps one sample dominant most of the time; 0 turns
            mixup off (then ``cutmix_alpha`` must be > 0).
        cutmix_alpha: cutmix λ ~ Beta(cutmix_alpha, cutmix_alpha); 0 (default) turns cutmix off.
        switch_prob: with both on, the probability that a step uses cutmix (timm's ``switch_prob``).
        lam_mode: ``"batch"`` — one λ (and one cutmix box) for the whole batch, as in the mixup paper and
            timm — or ``"sample"`` — one per row.
        prob: probability that a step mixes at all.
        dominant: draw ``max(λ, 1-λ)`` so each row's own sample dominates (fastai's choice).
        mode: ``"one"`` (one layer drawn per step: manifold mixup) or ``"all"`` (every layer, one plan).
        weights: relative probability of each layer for ``mode="one"`` (uniform when ``None``).
        stop_step / stop_epoch: plain training from this step / epoch on.
        label_smoothing: smoothing of class targets before mixing, a share in [0, 1).
        exclude_classes: classes whose rows (and their partners) are never mixed.

    Sequences are stored as tuples, so settings compare, hash and serialise as values.
    """

    alpha: float = 0.4
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5
    lam_mode: str = "batch"
    prob: float = 1.0
    dominant: bool = False
    mode: str = "one"
    weights: tuple[float, ...] | None = None
    stop_step: int | None = None
    stop_epoch: int | None = None
    label_smoothing: float = 0.0
    exclude_classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        settle = object.__setattr__.__get__(self)  # the dataclass is frozen: normalise in place once
        settle("alpha", check_alpha(self.alpha, allow_zero=True))
        settle("cutmix_alpha", check_alpha(self.cutmix_alpha, "cutmix_alpha", allow_zero=True))
        if self.alpha == 0 and self.cutmix_alpha == 0:
            raise UsageError(
                "alpha=0 and cutmix_alpha=0 turn both methods off; give alpha=0.4 (mixup) or "
                "cutmix_alpha=1.0 (cutmix), or both."
            )
        settle("switch_prob", check_probability("switch_prob", self.switch_prob))
        settle("prob", check_probability("prob", self.prob))
        if self.lam_mode not in LAM_MODES:
            raise UsageError(f"lam_mode={self.lam_mode!r} is not one of {LAM_MODES}; use 'batch' or 'sample'.")
        if self.mode not in MODES:
            raise UsageError(
                f"mode={self.mode!r} is not 'one' (one layer drawn per step) or 'all' (every layer each step)."
            )
        if not isinstance(self.dominant, bool):
            raise TypeError(f"dominant must be True or False, got {type(self.dominant).__name__} {self.dominant!r}.")
        settle("weights", self._checked_weights())
        for name in ("stop_step", "stop_epoch"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 0, " (mixing stops from that index on) or None")
        if not is_number(self.label_smoothing) or not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"label_smoothing={self.label_smoothing!r} must be a number in [0, 1).")
        settle("label_smoothing", float(self.label_smoothing))
        settle("exclude_classes", self._checked_classes())

    @property
    def uses_cutmix(self) -> bool:
        """Whether some steps may use CutMix, whose boxes need the spatial map (pooled features will not do)."""
        return self.cutmix_alpha > 0 and (self.alpha == 0 or self.switch_prob > 0)

    def _checked_weights(self) -> tuple[float, ...] | None:
        if self.weights is None:
            return None
        if self.mode == "all":
            raise UsageError("weights= only applies to mode='one' (one layer drawn per step); drop it for 'all'.")
        weights = tuple(self.weights) if isinstance(self.weights, Sequence) else None
        if weights is None or not all(is_number(w) for w in weights):
            raise TypeError(f"weights must be a list of numbers, one per layer, got {self.weights!r}.")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise UsageError(f"weights={list(weights)!r} must be finite, >= 0 and not all zero.")
        return tuple(float(w) for w in weights)

    def _checked_classes(self) -> tuple[int, ...] | None:
        classes = self.exclude_classes
        if classes is None:
            return None
        if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
            raise TypeError(f"exclude_classes must be a list of class indices, got {type(classes).__name__}.")
        bad = [c for c in classes if not is_int(c)]
        if bad:
            raise TypeError(f"exclude_classes must hold int class indices, got {bad!r}.")
        negative = [c for c in classes if c < 0]
        if negative:
            raise UsageError(
                f"exclude_classes={list(classes)!r} has {negative}, but class indices must be >= 0; list only "
                "existing classes (or fix num_classes)."
            )
        return tuple(sorted(set(classes)))
