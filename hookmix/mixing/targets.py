"""Targets and loss for a mixed step: the second consumer of the mix plan.

Target kinds (inferred by :func:`infer_kind`, or forced with ``targets=`` on the mixer):

* ``"index"`` — class indices (B,) of any integer dtype (a bool (B,) with ``num_classes=2`` too). The
  loss is mixed instead of the targets: ``lam * L(out, y) + (1 - lam) * L(out, y[perm])`` with the
  criterion exactly as given (fastai's ``stack_y=True``); with ``num_classes`` the mixed one-hot
  targets are available too (timm's soft targets).
* ``"label"`` — one-hot or soft labels (B, C) of any dtype (converted to float) with values in [0, 1].
  The targets are mixed: ``lam * y + (1 - lam) * y[perm]`` (fastai's ``stack_y=False``). Multi-hot rows
  are accepted as labels too, but smoothing them needs ``"multilabel"``.
* ``"multilabel"`` — (B, C) labels in [0, 1], each an independent binary target (``BCEWithLogitsLoss``).
* ``"regression"`` — float targets (B,) or (B, D), mixed like labels, never smoothed.

Label smoothing (``label_smoothing=s``) applies to class targets before mixing, as in timm: each one-hot
row becomes ``(1 - s) * onehot + s / C``; each multi-label target ``y * (1 - s) + s / 2`` (a binary
target smoothed over its two values, timm's ``Mixup`` for multi-label).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from hookmix.core.checks import check_class_indices, check_int
from hookmix.core.errors import UsageError
from hookmix.mixing.blend import mix_tensor
from hookmix.mixing.plan import MixPlan
from hookmix.mixing.settings import MixSettings

__all__ = ["check_classes", "excluded_rows", "infer_kind", "KINDS", "MixStep", "TargetRules", "validate_targets"]

KINDS = ("auto", "index", "label", "multilabel", "regression")
_ROW_SUM_TOL = 1e-3


def infer_kind(y: torch.Tensor, num_classes: int | None) -> str:
    """The target kind of ``y``: integer (B,) -> index, bool (B,) with ``num_classes=2`` -> index,
    integer/bool (B, C) -> label, float (B, C) with ``C == num_classes`` -> label, other float -> regression.

    With ``num_classes`` given the targets are class targets, so float (B,) or float (B, C') with
    ``C' != num_classes`` raise instead of silently training as regression targets (force
    ``targets="regression"`` for those).
    """
    integral = not y.is_floating_point() and not y.is_complex()
    if y.dim() == 1 and integral and (y.dtype != torch.bool or num_classes == 2):
        return "index"
    if y.dim() == 2 and (integral or y.shape[1] == num_classes):
        return "label"
    if num_classes is not None and y.is_floating_point() and y.dim() == 1:
        raise TypeError(
            f"targets are {y.dtype} of shape {tuple(y.shape)} but num_classes={num_classes} makes them class "
            "indices, which must be integers; pass y.long(), or targets='regression' for real-valued targets."
        )
    if num_classes is not None and y.is_floating_point() and y.dim() == 2:
        raise UsageError(
            f"targets have shape {tuple(y.shape)} but num_classes={num_classes}: one-hot / soft labels need "
            f"(B, {num_classes}); fix num_classes, or pass targets='regression' for real-valued vectors."
        )
    return "regression"


def _stats(y: torch.Tensor) -> tuple[float, float, bool, float, float]:
    """(min, max, all finite, smallest row sum, largest row sum) of ``y`` with one host synchronisation."""
    yf = y.float()
    rows = yf.sum(dim=1) if yf.dim() == 2 else yf.new_ones(1)
    stats = torch.stack([yf.min(), yf.max(), torch.isfinite(yf).all().float(), rows.min(), rows.max()]).tolist()
    return stats[0], stats[1], bool(stats[2]), stats[3], stats[4]


def validate_targets(
    y: Any, kind: str, num_classes: int | None, argument: str = "targets", label_smoothing: float = 0.0
) -> int | None:
    """Raise ``TypeError``/``ValueError`` for targets that cannot be of ``kind`` (one host sync).

    Returns the largest class index for index targets (checked against the logits' width in
    :meth:`MixStep.loss`), ``None`` for other kinds.
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor, got {type(y).__name__}.")
    if y.dim() not in (1, 2) or y.shape[0] == 0:
        raise UsageError(
            f"{argument} has shape {tuple(y.shape)}; expected (B,) class indices or regression values, "
            "or (B, C) one-hot / multi-label / soft labels / regression vectors, with B >= 1."
        )
    if kind == "index":
        if y.dim() != 1 or y.is_floating_point() or y.is_complex():
            raise TypeError(
                f"class-index {argument} must be an integer tensor of shape (B,), got dtype {y.dtype} shape "
                f"{tuple(y.shape)}; use y.long(), or targets='regression' / 'label' for other targets."
            )
        fix = (
            "relabel them, and drop rows meant to be ignored (e.g. ignore_index=-100) before plan(): they cannot "
            "be mixed; or pass the right num_classes"
        )
        return check_class_indices(y, num_classes, f"class-index {argument}", fix)[1]
    low, high, finite, row_min, row_max = _stats(y)
    if not finite:
        raise UsageError(f"{argument} contains NaN or inf; clean the data before training.")
    if kind in ("label", "multilabel"):
        _check_labels(y, kind, num_classes, argument, (low, high), (row_min, row_max), label_smoothing)
    return None


def _check_labels(
    y: torch.Tensor,
    kind: str,
    num_classes: int | None,
    argument: str,
    values: tuple[float, float],
    row_sums: tuple[float, float],
    label_smoothing: float,
) -> None:
    """The checks of (B, C) label targets, given their range of ``values`` and of ``row_sums``."""
    if y.dim() != 2:
        raise UsageError(
            f"label {argument} must have shape (B, C), got {tuple(y.shape)}; class indices (B,) need an integer dtype."
        )
    if num_classes is not None and y.shape[1] != num_classes:
        raise UsageError(
            f"label {argument} have {y.shape[1]} columns but num_classes={num_classes}; give (B, "
            f"{num_classes}) labels or num_classes={y.shape[1]}."
        )
    low, high = values
    if low < 0 or high > 1:
        raise UsageError(
            f"label {argument} hold values in [{low:g}, {high:g}] but one-hot / multi-label / soft "
            "labels must lie in [0, 1]; use targets='regression' for unbounded targets."
        )
    if kind == "label" and label_smoothing and max(abs(row_sums[0] - 1), abs(row_sums[1] - 1)) > _ROW_SUM_TOL:
        raise UsageError(
            f"label {argument} have rows summing to [{row_sums[0]:g}, {row_sums[1]:g}], so they are not one-hot "
            "or soft labels, which label_smoothing spreads as s / C. For multi-label targets pass "
            "targets='multilabel': each label is then smoothed as a binary target, y * (1 - s) + s / 2."
        )


def excluded_rows(y: torch.Tensor, kind: str, classes: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows whose hard label is an excluded class.

    The hard labels are the class index (index targets), each label ``>= 0.5`` (multi-label), or the
    row's largest entries (one-hot, soft or smoothed labels: a smoothed row's ``s / C`` is no label).
    """
    if kind == "index":
        return torch.isin(y, classes.to(y.device))
    y = y.float()
    present = y >= 0.5 if kind == "multilabel" else (y == y.amax(dim=1, keepdim=True)) & (y > 0)
    return present[:, classes.to(y.device)].any(dim=1)


def check_classes(classes: tuple[int, ...] | None, num_classes: int | None) -> torch.Tensor | None:
    """``exclude_classes`` (types checked by :class:`hookmix.MixSettings`) against
    ``num_classes``; returns them as an int64 tensor."""
    if classes is None:
        return None
    out_of_range = [c for c in classes if num_classes is not None and c >= num_classes]
    if out_of_range:
        raise UsageError(
            f"exclude_classes={list(classes)!r} has {out_of_range}, but class indices must be in "
            f"[0, {num_classes - 1}]; list only existing classes (or fix num_classes)."
        )
    return torch.tensor(classes, dtype=torch.long)


def _row_weights(criterion: Any, y: torch.Tensor) -> torch.Tensor:
    """(B,) weight of each row in ``criterion``'s mean: its class weight (``weight=``), 0 for
    ``ignore_index`` rows, 1 otherwise; fastai's loss wrappers are looked through (``.func``)."""
    inner = getattr(criterion, "func", criterion)
    weight = getattr(inner, "weight", None)
    rows = weight.to(y.device)[y] if isinstance(weight, torch.Tensor) else torch.ones(y.shape, device=y.device)
    ignore = getattr(inner, "ignore_index", None)
    return rows.masked_fill(y == ignore, 0.0) if isinstance(ignore, int) else rows


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
    index_max: int | None = None

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
            raise UsageError("this step was planned without targets; call mixer.plan(y) to mix targets too.")
        return self.y

    def _dense(self) -> torch.Tensor:
        """(B, C) float class targets (smoothed), or float regression targets."""
        y = self._require_targets()
        if self.kind == "regression":
            return y.float()
        if self.kind == "index":
            if self.num_classes is None:
                raise UsageError(
                    "soft targets from class indices need the number of classes: create the mixer with num_classes=C."
                )
            y = F.one_hot(y.long(), self.num_classes)
        y = y.float()
        if self.label_smoothing:
            share = 2 if self.kind == "multilabel" else y.shape[1]
            y = y * (1.0 - self.label_smoothing) + self.label_smoothing / share
        return y

    @property
    def targets(self) -> torch.Tensor:
        """Mixed float targets: (B, C) for class targets, (B,) or (B, D) for regression."""
        dense = self._dense()
        if not self.plan.mixed:
            return dense
        return mix_tensor(dense, self.plan.lam.to(dense.device), self.plan.perm.to(dense.device))

    def _check_width(self, output: torch.Tensor) -> None:
        if self.index_max is not None and output.dim() >= 2 and self.index_max >= output.shape[1]:
            raise UsageError(
                f"the targets hold class index {self.index_max} but the output has {output.shape[1]} columns "
                f"{tuple(output.shape)}, so that class has no logit; give the model {self.index_max + 1} or more "
                "outputs, or relabel the classes to [0, C)."
            )

    def loss(self, criterion: Callable[..., torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        """The training loss of ``output`` under this step's mixing.

        Class indices, one λ for the batch: ``lam * criterion(output, y) + (1 - lam) *
        criterion(output, y[perm])``, the criterion exactly as given (its ``weight``, ``ignore_index``,
        ``label_smoothing`` and reduction). A plain callable that returns per-row losses (B,) gets them
        mixed per row and averaged, as fastai's ``MixUp`` does.

        Class indices, a λ per row (``lam_mode="sample"``, ``exclude_classes``): each row's loss is
        ``lam_i * l(out_i, y_i) + (1 - lam_i) * l(out_i, y_perm_i)``, from the criterion with
        ``reduction="none"`` (any module with a ``reduction`` attribute, restored afterwards), reduced
        as the criterion says: ``"sum"`` sums the rows; ``"mean"`` divides by the rows' mixed weights
        ``sum_i lam_i * w(y_i) + (1 - lam_i) * w(y_perm_i)``, ``w`` the class weight (0 for
        ``ignore_index``). Because ``perm`` is a permutation, that is exactly the batch rule when all λ
        are equal, and ``criterion(output, y)`` when no row mixes. A plain callable must return
        per-row losses (B,) here.

        With ``label_smoothing`` on the mixer, or for label / regression targets, the criterion gets the
        mixed float targets instead: ``criterion(output, step.targets)``.
        """
        y = self._require_targets()
        if self.kind != "index" or self.label_smoothing:
            return criterion(output, self.targets)
        y = y.long()
        self._check_width(output)
        if not self.plan.mixed:
            return criterion(output, y)
        lam = self.plan.lam.to(output.device)
        y_b = y[self.plan.perm.to(y.device)]
        reduction = getattr(criterion, "reduction", None)
        if self.uniform_lam or not isinstance(reduction, str):
            loss_a, loss_b = criterion(output, y), criterion(output, y_b)
            if loss_a.dim() == 0 and not self.uniform_lam:
                raise UsageError(
                    "criterion returns one scalar for the batch, but this step has a different λ per row "
                    "(lam_mode='sample' or exclude_classes); give a criterion that returns per-row losses "
                    "(reduction='none') or one with a `reduction` attribute."
                )
            weight = lam[0] if self.uniform_lam else lam
            mixed = weight * loss_a + (1 - weight) * loss_b
            return mixed if loss_a.dim() == 0 or isinstance(reduction, str) else mixed.mean()
        criterion.reduction = "none"  # type: ignore[attr-defined]
        try:
            per_row = torch.lerp(criterion(output, y_b), criterion(output, y), lam)
        finally:
            criterion.reduction = reduction  # type: ignore[attr-defined]
        if reduction == "sum":
            return per_row.sum()
        if reduction == "mean":
            return per_row.sum() / torch.lerp(_row_weights(criterion, y_b), _row_weights(criterion, y), lam).sum()
        return per_row


@dataclass(frozen=True)
class TargetRules:
    """How a mixer reads each step's targets and turns its plan into a :class:`MixStep`.

    Built once by :meth:`build` from :class:`~hookmix.HookMixer`'s ``num_classes``, ``targets=`` kind,
    ``validate`` and mixing settings (label smoothing, λ per batch or row, excluded classes), which stay
    fixed for the mixer's life.
    """

    num_classes: int | None
    kind: str
    validate: bool
    label_smoothing: float
    uniform_lam: bool
    excluded: torch.Tensor | None

    @classmethod
    def build(cls, settings: MixSettings, num_classes: int | None, kind: str, validate: bool) -> TargetRules:
        """Check the mixer's target arguments against each other and its settings."""
        if num_classes is not None:
            check_int("num_classes", num_classes, 2, " (or None)")
        if kind not in KINDS:
            raise UsageError(f"targets={kind!r} is not one of {KINDS}.")
        if settings.label_smoothing and num_classes is None:
            raise UsageError("label_smoothing needs num_classes=C to know the uniform share s / C.")
        excluded = check_classes(settings.exclude_classes, num_classes)
        uniform = settings.lam_mode == "batch" and excluded is None
        return cls(num_classes, kind, bool(validate), settings.label_smoothing, uniform, excluded)

    def read(self, targets: torch.Tensor | None) -> tuple[str | None, int | None]:
        """The kind of ``targets`` and, once validated, their largest class index (index targets)."""
        if targets is None:
            return None, None
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}.")
        kind = infer_kind(targets, self.num_classes) if self.kind == "auto" else self.kind
        index_max = None
        if self.validate:
            index_max = validate_targets(targets, kind, self.num_classes, label_smoothing=self.label_smoothing)
        return kind, index_max

    def check_excludable(self, targets: torch.Tensor | None, kind: str | None) -> None:
        """Refuse a step that must leave excluded classes unmixed but has no class targets to find them."""
        if self.excluded is not None and (targets is None or kind == "regression"):
            raise UsageError("exclude_classes needs class targets: pass class indices or labels to plan(y).")

    def keep_excluded(self, plan: MixPlan, targets: torch.Tensor | None, kind: str | None) -> MixPlan:
        """``plan`` with the rows of an excluded class, and the rows whose partner is one, left unmixed
        (``targets``: class targets, see :meth:`check_excludable`)."""
        if self.excluded is None or targets is None or kind is None or not plan.mixed:
            return plan
        excluded = excluded_rows(targets, kind, self.excluded).to(plan.lam.device)
        return plan.with_unmixed_rows(excluded | excluded[plan.perm])

    def step(self, plan: MixPlan, targets: torch.Tensor | None, kind: str | None, index_max: int | None) -> MixStep:
        """The :class:`MixStep` of ``plan`` with this batch's ``targets`` as :meth:`read` found them."""
        smoothed = kind in ("index", "label", "multilabel")
        return MixStep(
            plan=plan,
            y=targets,
            kind=kind,
            num_classes=self.num_classes,
            label_smoothing=self.label_smoothing if smoothed else 0.0,
            uniform_lam=self.uniform_lam,
            index_max=index_max,
        )
