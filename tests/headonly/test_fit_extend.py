"""Training a finished fit further (``resume=True`` with more ``epochs``).

Bugs a maintainer could plausibly make here, and the test that catches each:

* the extension keeps the finished cosine schedule (lr stays 0, nothing trains) —
  ``test_a_finished_fit_trains_further_on_a_new_cosine_cycle`` (lr of the extra epochs, weights move);
* an extension interrupted and resumed rebuilds the schedule from its config instead of its checkpoint
  (restarting the cycle again, or losing the restart) —
  ``test_an_extension_interrupted_and_resumed_equals_the_uninterrupted_one``;
* a checkpoint mid-run accepts another ``epochs`` (its schedule would silently change) —
  ``test_epochs_change_only_extends_a_finished_fit``;
* other settings sneak through with the epochs — ``test_epochs_change_only_extends_a_finished_fit``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from hookmix import FitConfig, MixSettings, UsageError, fit
from hookmix.headonly import training


def _data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 6, generator=gen)
    y = torch.randint(0, 3, (48,), generator=gen)
    return x, y, x[:16], y[:16]


def _fit(config: FitConfig, directory: Path | None, resume: bool = False) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    head = nn.Linear(6, 3)
    result = fit(
        head, "input", *_data(), config, num_classes=3, checkpoint_dir=directory, resume=resume, progress=False
    )
    return head, result


CONFIG = FitConfig(epochs=2, batch_size=16, lr=0.05, mixing=MixSettings(alpha=0.4), seed=3)


def test_a_finished_fit_trains_further_on_a_new_cosine_cycle(tmp_path: Path) -> None:
    finished, first = _fit(CONFIG, tmp_path)
    assert first.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cycle ended
    before = finished.weight.detach().clone()
    extended, result = _fit(replace(CONFIG, epochs=4), tmp_path, resume=True)
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert result.history[:2] == first.history
    assert result.restarts == [2]
    steps = 3  # 48 rows, batch 16: per epoch; the new cycle spans 2 epochs = 6 steps
    expected = [0.05 * (1 + math.cos(math.pi * s / (2 * steps))) / 2 for s in (steps, 2 * steps)]
    assert [row["lr"] for row in result.history[2:]] == pytest.approx(expected, abs=1e-9)
    assert not torch.equal(extended.weight, before)


def test_an_extension_interrupted_and_resumed_equals_the_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _fit(CONFIG, a)
    whole, expected = _fit(replace(CONFIG, epochs=5), a, resume=True)
    _fit(CONFIG, b)
    save = training._TrainState.save

    def crash_after_epoch_3(self: training._TrainState, directory: Path) -> None:
        save(self, directory)
        if len(self.result.history) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(training._TrainState, "save", crash_after_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _fit(replace(CONFIG, epochs=5), b, resume=True)
    monkeypatch.undo()
    again, resumed = _fit(replace(CONFIG, epochs=5), b, resume=True)
    assert resumed.history == expected.history and resumed.restarts == [2]
    assert resumed.lams == expected.lams
    assert torch.equal(again.weight, whole.weight)


def test_epochs_change_only_extends_a_finished_fit(tmp_path: Path) -> None:
    _fit(replace(CONFIG, epochs=3), tmp_path)
    with pytest.raises(UsageError, match=r"finished of epochs=3; resume it with epochs=3"):
        _fit(replace(CONFIG, epochs=2), tmp_path, resume=True)
    with pytest.raises(UsageError, match=r"other settings \{'epochs': \(3, 4\), 'lr': \(0.05, 0.1\)\}"):
        _fit(replace(CONFIG, epochs=4, lr=0.1), tmp_path, resume=True)
