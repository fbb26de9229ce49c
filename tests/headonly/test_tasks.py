"""A :class:`~hookmix.headonly.tasks.Task` owns its metric names, its headline and their wording, so the
app asks it instead of comparing task names.

Bugs a maintainer could plausibly make here, and the test that catches each:
- a task's validation row under other names or missing a metric (``val_map`` for a multi-class run, the
  multi-label F1 dropped), or values of the other task's evaluation:
  ``test_each_task_reports_its_metrics_under_its_names``;
- the headline or its wording swapped between tasks (a multi-label run reporting "val accuracy"):
  ``test_each_task_describes_its_headline_first``;
- thresholds tuned for a multi-class run, or multi-label F1 not measured at the thresholds given:
  ``test_only_multilabel_tasks_tune_and_apply_thresholds``;
- a recorded task name that is not a task read as multi-class: ``test_a_recorded_name_gives_its_task_or_a_usage_error``.
"""

from __future__ import annotations

import pytest
import torch

from hookmix.core.errors import UsageError
from hookmix.evaluation.metrics import evaluate, evaluate_multilabel, tune_thresholds
from hookmix.headonly.tasks import MULTICLASS, MULTILABEL, TASKS, task_named


def _multiclass() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 4, generator=g), torch.randint(0, 4, (40,), generator=g)


def _multilabel() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 3, generator=g), (torch.rand(40, 3, generator=g) < 0.4).float()


def test_each_task_reports_its_metrics_under_its_names() -> None:
    logits, labels = _multiclass()
    found = evaluate(logits, labels)
    assert MULTICLASS.metrics(logits, labels) == {
        "val_nll": found["nll"],
        "val_accuracy": found["accuracy"],
        "val_ece": found["ece"],
    }
    logits, labels = _multilabel()
    found = evaluate_multilabel(logits, labels)
    row = MULTILABEL.metrics(logits, labels)
    assert row == {"val_nll": found["nll"], "val_map": found["map"], "val_f1": found["f1"], "val_ece": found["ece"]}
    assert list(row) == list(MULTILABEL.metric_names)
    for task in TASKS.values():
        assert task.headline in task.metric_names and task.shown[0][0] == task.headline


def test_each_task_describes_its_headline_first() -> None:
    row = {"val_accuracy": 0.91204, "val_map": 0.64, "val_f1": 0.51, "val_nll": 0.3, "val_ece": 0.02}
    assert MULTICLASS.describe(row) == "val accuracy 0.9120"
    assert MULTILABEL.describe(row) == "val mAP 0.6400, F1@0.5 0.5100"


def test_only_multilabel_tasks_tune_and_apply_thresholds() -> None:
    logits, labels = _multiclass()
    assert MULTICLASS.thresholds(logits, labels) is None
    with pytest.raises(UsageError, match="thresholds= apply to multi-label runs only"):
        MULTICLASS.metrics(logits, labels, (0.5,) * 4)
    logits, labels = _multilabel()
    tuned = MULTILABEL.thresholds(logits, labels)
    assert tuned == tuple(tune_thresholds(logits, labels).tolist())
    at_tuned = evaluate_multilabel(logits, labels, torch.tensor(tuned, dtype=torch.float64))
    assert (
        MULTILABEL.metrics(logits, labels, tuned)["val_f1"]
        == at_tuned["f1"]
        > MULTILABEL.metrics(logits, labels)["val_f1"]
    )


def test_a_recorded_name_gives_its_task_or_a_usage_error() -> None:
    assert task_named("multiclass") is MULTICLASS and task_named("multilabel") is MULTILABEL
    with pytest.raises(UsageError, match=r"task='regression' is not one of multiclass, multilabel"):
        task_named("regression")
