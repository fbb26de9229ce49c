"""``fit`` reads no training value back to the host per step (on a GPU each read is a host synchronisation
that stalls the loop), while bad labels are still refused once, before the first step.

On the CPU there is no synchronisation to observe, so the labels and inputs are wrapped in a tensor subclass
standing for device memory: its ``__torch_function__`` sees every operation on them and on every tensor computed
from them (batches, logits, losses), and logs each one that copies values to the host (``tolist``, ``item``,
``bool(t)``, ``float(t)``, ``.cpu()``, ``nonzero``, ...). An epoch of 4x the steps must log no more of them.

Bugs a maintainer could plausibly make here, and the test that catches each:

* ``fit``'s mixer left with ``validate=True`` (the default for user loops), so every ``plan()`` checks the
  batch's targets with one ``.tolist()``, or any other per-step read added to the loop (a ``loss.item()`` for the
  progress bar, ``float(total)`` per step):
  ``test_an_epoch_reads_no_training_value_back_per_step`` (multi-class and multi-label);
* the per-step check dropped without the once-per-fit one, so labels out of range (or not multi-hot) train
  silently or fail deep in the loss: ``test_bad_train_labels_are_refused_before_the_first_step``.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable

import pytest
import torch
from torch import nn

from hookmix.core.errors import UsageError
from hookmix.headonly.training import FitConfig, fit
from hookmix.mixing.settings import MixSettings

HOST_READS = {
    torch.Tensor.tolist,
    torch.Tensor.item,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.unique,
    torch.unique,
    torch.masked_select,
}
"""Operations that copy a device tensor's values (or a data-dependent shape) to the host: a CUDA synchronisation."""


class OnDevice(torch.Tensor):
    """A tensor standing for device memory: every host read of it, or of a tensor computed from it, is logged in
    :attr:`reads` (the Python stack of each, for the failure message)."""

    reads: list[str] = []

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: tuple[type, ...], args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func in HOST_READS:
            cls.reads.append("".join(traceback.format_stack(limit=6)[:-1]))
        return super().__torch_function__(func, types, args, kwargs or {})


def data(n: int, multilabel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 8, generator=g)
    y = (torch.rand(n, 3, generator=g) < 0.5).float() if multilabel else torch.randint(0, 3, (n,), generator=g)
    return x, y


def host_reads(n: int, multilabel: bool, settings: MixSettings) -> list[str]:
    """The host reads of device values during a one-epoch fit on ``n`` rows (batches of 4)."""
    x, y = data(n, multilabel)
    val_x, val_y = data(6, multilabel)
    torch.manual_seed(0)
    OnDevice.reads = []
    config = FitConfig(epochs=1, batch_size=4, mixing=settings)
    fit(nn.Linear(8, 3), "input", x.as_subclass(OnDevice), y.as_subclass(OnDevice), val_x, val_y, config,
        num_classes=3, progress=False)  # fmt: skip
    return OnDevice.reads


@pytest.mark.parametrize(
    "multilabel, settings",
    [(False, MixSettings(alpha=0.4)), (False, MixSettings(alpha=0.4, label_smoothing=0.1)), (True, MixSettings())],
    ids=["multiclass", "multiclass-smoothed", "multilabel"],
)
def test_an_epoch_reads_no_training_value_back_per_step(multilabel: bool, settings: MixSettings) -> None:
    """4 steps and 16 steps: the same few reads per fit (the labels' check before the loop, the epoch's mean
    loss after it), none per step."""
    few, many = host_reads(16, multilabel, settings), host_reads(64, multilabel, settings)
    first_extra = many[len(few)] if len(many) > len(few) else ""
    assert len(many) == len(few) <= 3, f"{len(few)} reads for 4 steps, {len(many)} for 16; one per step:\n{first_extra}"


@pytest.mark.parametrize(
    "multilabel, bad, message",
    [
        (False, 3, "train_labels must hold class indices >= 0 and below num_classes=3, i.e. in [0, 2], got values "
         "in [0, 3] (it contains 3); relabel them or pass the right num_classes."),
        (True, 0.5, "train_labels must be multi-hot (0 or 1) rows; threshold soft targets first."),
    ],
    ids=["class-out-of-range", "not-multi-hot"],
)  # fmt: skip
def test_bad_train_labels_are_refused_before_the_first_step(multilabel: bool, bad: float, message: str) -> None:
    """One bad label in the last batch: refused with one line naming it before anything trains."""
    x, y = data(16, multilabel)
    y[-1] = bad
    head = nn.Linear(8, 3)
    before = [p.detach().clone() for p in head.parameters()]
    with pytest.raises(UsageError) as info:
        fit(head, "input", x, y, x[:4], y[:4], FitConfig(epochs=1, batch_size=4), num_classes=3, progress=False)
    assert str(info.value) == message
    assert all(torch.equal(a, b) for a, b in zip(before, head.parameters()))
