"""What :func:`hookmix.fit` trains for: one class per example, or a set of labels per example.

* multi-class: labels ``(N,)`` integer class indices; softmax cross-entropy (the mixed loss
  ``λ·CE(out, y) + (1−λ)·CE(out, y[perm])``); validation accuracy, NLL and ECE.
* multi-label: labels ``(N, C)`` float multi-hot rows; ``BCEWithLogitsLoss`` on the mixed ``(B, C)``
  targets (the mixer's ``targets="multilabel"``); validation macro mAP, macro-F1 at 0.5, mean BCE and
  the mean per-label ECE (:func:`hookmix.evaluate_multilabel`, torchmetrics), and per-label decision
  thresholds tuned on validation.

A :class:`Task` owns everything that differs between the two — the loss, the label check, the metric
names and which one heads a report, the evaluation, the reliability curve, the thresholds — so that code
reporting a run asks its task (:func:`task_named` from a recorded name) instead of comparing names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hookmix.core.checks import check_class_indices
from hookmix.core.errors import UsageError
from hookmix.evaluation.metrics import (
    ReliabilityCurve,
    evaluate,
    evaluate_multilabel,
    reliability,
    reliability_multilabel,
    tune_thresholds,
)

__all__ = ["MULTICLASS", "MULTILABEL", "TASKS", "Task", "task_named", "task_of"]


@dataclass(frozen=True)
class Task:
    """One kind of target: how it is checked, which loss trains it, what validation reports.

    Attributes:
        name: ``"multiclass"`` or ``"multilabel"``, as runs record it.
        targets: the :class:`~hookmix.HookMixer` target kind.
        metric_names: the keys of a validation row (:meth:`metrics`), in report order.
        headline: the metric a progress bar and a report lead with.
        shown: ``(metric, label)`` pairs of the one-line summary (:meth:`describe`), headline first.
    """

    name: str
    targets: str
    metric_names: tuple[str, ...]
    headline: str
    shown: tuple[tuple[str, str], ...]

    @property
    def _multilabel(self) -> bool:
        return self.targets == "multilabel"

    def criterion(self) -> nn.Module:
        return nn.BCEWithLogitsLoss() if self._multilabel else nn.CrossEntropyLoss()

    def check(self, labels: torch.Tensor, num_classes: int, name: str) -> None:
        """Refuse labels that are not this task's, naming the argument and the fix."""
        if not self._multilabel:
            check_class_indices(labels, num_classes, name, "relabel them or pass the right num_classes")
            return
        if labels.shape[1] != num_classes:
            raise UsageError(f"{name} has {labels.shape[1]} labels per row but num_classes={num_classes}.")
        if ((labels != 0) & (labels != 1)).any():
            raise UsageError(f"{name} must be multi-hot (0 or 1) rows; threshold soft targets first.")

    def evaluate(
        self, logits: torch.Tensor, labels: torch.Tensor, thresholds: tuple[float, ...] | None = None
    ) -> dict[str, float]:
        """The evaluation of :mod:`hookmix.evaluation.metrics` for this task: ``nll`` and ``ece`` for both,
        ``accuracy`` (multi-class) or ``map`` and ``f1`` (multi-label; F1 at ``thresholds``, per label,
        else 0.5). ``logits`` ``(N, C)``; ``labels`` ``(N,)`` or ``(N, C)``."""
        if not self._multilabel:
            if thresholds is not None:
                raise UsageError("thresholds= apply to multi-label runs only; a multi-class run takes the top class.")
            return evaluate(logits, labels)
        cut = None if thresholds is None else torch.tensor(thresholds, dtype=torch.float64)
        return evaluate_multilabel(logits, labels, cut)

    def metrics(
        self, logits: torch.Tensor, labels: torch.Tensor, thresholds: tuple[float, ...] | None = None
    ) -> dict[str, float]:
        """The validation row, keyed by :attr:`metric_names`: ``val_nll`` and ``val_ece`` for both,
        ``val_accuracy`` (multi-class) or ``val_map`` and ``val_f1`` (multi-label)."""
        found = self.evaluate(logits, labels, thresholds)
        return {name: found[name.removeprefix("val_")] for name in self.metric_names}

    def reliability(self, logits: torch.Tensor, labels: torch.Tensor) -> ReliabilityCurve:
        """The reliability curve to draw: of the top-1 confidence (multi-class), or of every (example,
        label) probability pooled (multi-label)."""
        return reliability_multilabel(logits, labels) if self._multilabel else reliability(logits, labels)

    def thresholds(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, ...] | None:
        """Per-label decision thresholds tuned for F1 on these examples (multi-label), ``None`` for a
        multi-class task, which predicts the top class."""
        return tuple(tune_thresholds(logits, labels).tolist()) if self._multilabel else None

    def describe(self, row: dict[str, float]) -> str:
        """The :attr:`shown` metrics of a validation row for people: ``"val accuracy 0.9120"``,
        ``"val mAP 0.6400, F1@0.5 0.5100"``."""
        return ", ".join(f"{label} {row[name]:.4f}" for name, label in self.shown)


MULTICLASS = Task(
    "multiclass",
    "auto",
    metric_names=("val_nll", "val_accuracy", "val_ece"),
    headline="val_accuracy",
    shown=(("val_accuracy", "val accuracy"),),
)
MULTILABEL = Task(
    "multilabel",
    "multilabel",
    metric_names=("val_nll", "val_map", "val_f1", "val_ece"),
    headline="val_map",
    shown=(("val_map", "val mAP"), ("val_f1", "F1@0.5")),
)
TASKS = {task.name: task for task in (MULTICLASS, MULTILABEL)}
"""Every task by the name a run records."""


def task_named(name: str) -> Task:
    """The task a run recorded by ``name`` (``"multiclass"`` or ``"multilabel"``)."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise UsageError(f"task={name!r} is not one of {', '.join(TASKS)}.") from None


def task_of(labels: object, name: str) -> Task:
    """The task ``labels`` are for: ``(N,)`` integers -> multi-class, ``(N, C)`` floats -> multi-label."""
    if not isinstance(labels, torch.Tensor) or labels.numel() == 0:
        raise UsageError(
            f"{name} must be a non-empty tensor: (N,) integer class indices or (N, C) float multi-hot rows, "
            f"got {type(labels).__name__}."
        )
    if labels.dim() == 1 and not labels.is_floating_point() and labels.dtype != torch.bool:
        return MULTICLASS
    if labels.dim() == 2 and labels.is_floating_point():
        return MULTILABEL
    raise UsageError(
        f"{name} must be (N,) integer class indices or (N, C) float multi-hot rows, got {labels.dtype} "
        f"{tuple(labels.shape)}; use labels.long() for classes, labels.float() for label sets."
    )
