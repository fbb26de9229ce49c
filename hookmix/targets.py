"""Targets and loss for a mixed step: the second consumer of the mix plan.

Target kinds (inferred by :func:`infer_kind`, or forced with ``targets=`` on the mixer):

* ``"index"`` — class indices (B,) of an integer dtype. The loss is mixed instead of the targets:
  ``lam * L(out, y) + (1 - lam) * L(out, y[perm])`` per row (fastai's ``stack_y=True``); with
  ``num_classes`` the mixed one-hot targets are available too (timm's soft targets).
* ``"label"`` — one-hot, multi-label or soft labels (B, C) of any dtype (converted to float) with
  values in [0, 1]. The targets are mixed: ``lam * y + (1 - lam) * y[perm]`` (fastai's ``stack_y=False``).
* ``"regression"`` — float targets (B,) or (B, D), mixed like labels, never smoothed.

Label smoothing (``label_smoothing=s``) applies to class targets as in timm: each row becomes
``(1 - s) * onehot + s / C`` before mixing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from hookmix.mixing import mix_tensor
from hookmix.plan import MixPlan

KINDS = ("auto", "index", "label", "regression")


def infer_kind(y: torch.Tensor, num_classes: int | None) -> str:
    """The target kind of ``y``: integer (B,) -> index, integer/bool (B, C) -> label, float (B, C) with
    ``C == num_classes`` -> label, other float -> regression.

    With ``num_classes`` given the targets are class targets, so float (B,) or float (B, C') with
    ``C' != num_classes`` raise instead of silently training as regression targets (force
    ``targets="regression"`` for those).
    """
    integral = not y.is_floating_point() and not y.is_complex()
    if y.dim() == 1 and integral and y.dtype != torch.bool:
        return "index"
    if y.dim() == 2 and (integral or y.shape[1] == num_classes):
        return "label"
    if num_classes is not None and y.is_floating_point() and y.dim() == 1:
        raise TypeError(
            f"targets are {y.dtype} of shape {tuple(y.shape)} but num_classes={num_classes} makes them class "
            "indices, which must be integers; pass y.long(), or targets='regression' for real-valued targets."
        )
    if num_classes is not None and y.is_floating_point() and y.dim() == 2:
        raise ValueError(
            f"targets have shape {tuple(y.shape)} but num_classes={num_classes}: one-hot / soft labels need "
            f"(B, {num_classes}); fix num_classes, or pass targets='regression' for real-valued vectors."
        )
    return "regression"


def _range(y: torch.Tensor) -> tuple[float, float, bool]:
    """(min, max, all finite) of ``y`` with one host synchronisation."""
    yf = y.float()
    stats = torch.stack([yf.min(), yf.max(), torch.isfinite(yf).all().float()]).tolist()
    return stats[0], stats[1], bool(stats[2])


def validate_targets(y: Any, kind: str, num_classes: int | None, argument: str = "targets") -> None:
    """Raise ``TypeError``/``ValueError`` for targets that cannot be of ``kind`` (one host sync)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor, got {type(y).__name__}.")
    if y.dim() not in (1, 2) or y.shape[0] == 0:
        raise ValueError(
            f"{argument} has shape {tuple(y.shape)}; expected (B,) class indices or regression values, "
            "or (B, C) one-hot / multi-label / soft labels / regression vectors, with B >= 1."
        )
    if kind == "index":
        if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(
                f"class-index {argument} must be an integer tensor of shape (B,), got dtype {y.dtype} shape "
                f"{tuple(y.shape)}; use y.long(), or targets='regression' / 'label' for other targets."
            )
        low, high, _ = _range(y)
        if low < 0:
            raise ValueError(
                f"class-index {argument} contains {int(low)}; class indices must be >= 0 — relabel them, and "
                "drop rows meant to be ignored (e.g. ignore_index=-100) before plan(): they cannot be mixed."
            )
        if num_classes is not None and high >= num_classes:
            raise ValueError(
                f"class-index {argument} contains {int(high)} but num_classes={num_classes}; "
                f"indices must be in [0, {num_classes - 1}] — pass the right num_classes."
            )
        return
    low, high, finite = _range(y)
    if not finite:
        raise ValueError(f"{argument} contains NaN or inf; clean the data before training.")
    if kind == "label":
        if y.dim() != 2:
            raise ValueError(
                f"label {argument} must have shape (B, C), got {tuple(y.shape)}; "
                "class indices (B,) need an integer dtype."
            )
        if num_classes is not None and y.shape[1] != num_classes:
            raise ValueError(
                f"label {argument} have {y.shape[1]} columns but num_classes={num_classes}; give (B, "
                f"{num_classes}) labels or num_classes={y.shape[1]}."
            )
        if low < 0 or high > 1:
            raise ValueError(
                f"label {argument} hold values in [{low:g}, {high:g}] but one-hot / multi-label / soft "
                "labels must lie in [0, 1]; use targets='regression' for unbounded targets."
            )


def excluded_rows(y: torch.Tensor, kind: str, classes: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows whose class (index targets) or any of whose labels (label targets) is excluded."""
    if kind == "index":
        return torch.isin(y, classes.to(y.device))
    return (y[:, classes.to(y.device)] > 0).any(dim=1)


def check_label_smoothing(value: Any) -> float:
    """Validate a label-smoothing share: a number in ``[0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing={value!r} must be a number in [0, 1).")
    return float(value)


def check_classes(argument: str, classes: Sequence[int] | None, num_classes: int | None) -> torch.Tensor | None:
    """Validate ``exclude_classes`` against ``num_classes``; returns them as an int64 tensor."""
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise TypeError(f"{argument} must be a list of class indices, got {type(classes).__name__}.")
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int)]
    if bad:
        raise TypeError(f"{argument} must hold int class indices, got {bad!r}.")
    out_of_range = [c for c in classes if c < 0 or (num_classes is not None and c >= num_classes)]
    if out_of_range:
        limit = f"in [0, {num_classes - 1}]" if num_classes is not None else ">= 0"
        raise ValueError(
            f"{argument}={list(classes)!r} has {out_of_range}, but class indices must be {limit}; list only "
            "existing classes (or fix num_classes)."
        )
    return torch.tensor(sorted(set(classes)), dtype=torch.long)


@dataclass(frozen=True)
class MixStep:
    """One training step's plan together with its targets: mixed targets and the mixed loss.

    Returned by :meth:`hookmix.HookMixer.plan`. ``lam``/``perm``/``layers`` describe what the hook will
    mix; :attr:`targets` and :meth:`loss` apply the same λ and partners to the targets.
    """

    plan: MixPlan
    y: torch.Tensor | None
    kind: str | None
    num_classes: int | None
    label_smoothing: float
    uniform_lam: bool

    @property
    def lam(self) -> torch.Tensor:
        """(B,) weight of each row's own sample (1.0 where the row is not mixed)."""
        return self.plan.lam

    @property
    def perm(self) -> torch.Tensor:
        """(B,) partner of each row."""
        return self.plan.perm

    @property
    def layers(self) -> tuple[str, ...]:
        """The layer(s) this step mixes (empty when it does not mix)."""
        return self.plan.layers

    @property
    def mixed(self) -> bool:
        return self.plan.mixed

    def _require_targets(self) -> torch.Tensor:
        if self.y is None:
            raise ValueError("this step was planned without targets; call mixer.plan(y) to mix targets too.")
        return self.y

    def _dense(self) -> torch.Tensor:
        """(B, C) float class targets (smoothed), or float regression targets."""
        y = self._require_targets()
        if self.kind == "regression":
            return y.float()
        if self.kind == "index":
            if self.num_classes is None:
                raise ValueError(
                    "soft targets from class indices need the number of classes: "
                    "create the mixer with num_classes=C."
                )
            y = F.one_hot(y, self.num_classes)
        y = y.float()
        if self.label_smoothing:
            y = y * (1.0 - self.label_smoothing) + self.label_smoothing / y.shape[1]
        return y

    @property
    def targets(self) -> torch.Tensor:
        """Mixed float targets: (B, C) for class targets, (B,) or (B, D) for regression."""
        dense = self._dense()
        if not self.plan.mixed:
            return dense
        return mix_tensor(dense, self.plan.lam.to(dense.device), self.plan.perm.to(dense.device))

    def loss(self, criterion: Callable[..., torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        """The training loss of ``output`` under this step's mixing.

        Class indices: ``lam * criterion(output, y) + (1 - lam) * criterion(output, y[perm])`` per row,
        reduced as the criterion's ``reduction`` says (``nn.CrossEntropyLoss`` and any module with a
        ``reduction`` attribute, set to ``"none"`` for the call and restored), or, for a plain callable,
        per row when it returns (B,) losses and per batch when it returns a scalar (only valid when every
        row has the same λ). With ``label_smoothing`` on the mixer, or for label / regression targets,
        the criterion gets the mixed float targets instead: ``criterion(output, step.targets)``.
        """
        y = self._require_targets()
        if self.kind != "index" or self.label_smoothing:
            return criterion(output, self.targets)
        if not self.plan.mixed:
            return criterion(output, y)
        lam = self.plan.lam.to(output.device)
        y_b = y[self.plan.perm.to(y.device)]
        reduction = getattr(criterion, "reduction", None)
        if isinstance(reduction, str):
            criterion.reduction = "none"  # type: ignore[attr-defined]
            try:
                per_row = lam * criterion(output, y) + (1 - lam) * criterion(output, y_b)
            finally:
                criterion.reduction = reduction  # type: ignore[attr-defined]
            return {"mean": per_row.mean, "sum": per_row.sum}.get(reduction, lambda: per_row)()
        loss_a, loss_b = criterion(output, y), criterion(output, y_b)
        if loss_a.dim() == 0:
            if not self.uniform_lam:
                raise ValueError(
                    "criterion returns one scalar for the batch, but this step has a different λ per row "
                    "(lam_mode='sample' or exclude_classes); give a criterion that returns per-row losses "
                    "(reduction='none') or one with a `reduction` attribute."
                )
            return lam[0] * loss_a + (1 - lam[0]) * loss_b
        return (lam * loss_a + (1 - lam) * loss_b).mean()
