"""What :func:`hookmix.fit` trains for: one class per example, or a set of labels per example.

* multi-class: labels ``(N,)`` integer class indices; softmax cross-entropy (the mixed loss
  ``λ·CE(out, y) + (1−λ)·CE(out, y[perm])``); validation accuracy, NLL and ECE.
* multi-label: labels ``(N, C)`` float multi-hot rows; ``BCEWithLogitsLoss`` on the mixed ``(B, C)``
  targets (the mixer's ``targets="multilabel"``); validation macro mAP, macro-F1 at 0.5, mean BCE and
  the mean per-label ECE (:func:`hookmix.evaluate_multilabel`, torchmetrics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hookmix.core.checks import check_class_indices
from hookmix.core.errors import UsageError
from hookmix.evaluation.metrics import evaluate, evaluate_multilabel

__all__ = ["MULTICLASS", "MULTILABEL", "Task", "task_of"]


@dataclass(frozen=True)
class Task:
    """One kind of target: how it is checked, which loss trains it, what validation reports."""

    name: str
    targets: str  # the HookMixer target kind

    def criterion(self) -> nn.Module:
        return nn.BCEWithLogitsLoss() if self.name == "multilabel" else nn.CrossEntropyLoss()

    def check(self, labels: torch.Tensor, num_classes: int, name: str) -> None:
        """Refuse labels that are not this task's, naming the argument and the fix."""
        if self.name == "multiclass":
            check_class_indices(labels, num_classes, name, "relabel them or pass the right num_classes")
            return
        if labels.shape[1] != num_classes:
            raise UsageError(f"{name} has {labels.shape[1]} labels per row but num_classes={num_classes}.")
        if ((labels != 0) & (labels != 1)).any():
            raise UsageError(f"{name} must be multi-hot (0 or 1) rows; threshold soft targets first.")

    def metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """The validation row: ``val_nll`` and ``val_ece`` for both, ``val_accuracy`` (multi-class) or
        ``val_map`` and ``val_f1`` (multi-label)."""
        if self.name == "multiclass":
            found = evaluate(logits, labels)
            return {"val_nll": found["nll"], "val_accuracy": found["accuracy"], "val_ece": found["ece"]}
        found = evaluate_multilabel(logits, labels)
        return {"val_nll": found["nll"], "val_map": found["map"], "val_f1": found["f1"], "val_ece": found["ece"]}

    @property
    def headline(self) -> str:
        """The metric a progress bar shows."""
        return "val_map" if self.name == "multilabel" else "val_accuracy"


MULTICLASS = Task("multiclass", "auto")
MULTILABEL = Task("multilabel", "multilabel")


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
