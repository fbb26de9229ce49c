"""The offline "digits-transfer" task: a small CNN pretrained on digits 0-4, few labels of digits 5-9.

Head-only fine-tuning assumes a frozen backbone pretrained on *other* classes and only a handful of
labelled examples of the new ones. This task reproduces exactly that setting with scikit-learn's
bundled ``load_digits`` (1,797 grey 8x8 images, pixel values 0..16), so the demo and the tests run
offline, on a CPU, in seconds:

* source: :func:`pretrain_source` trains :class:`DigitsCNN` on digits 0-4 (the fixed training part of
  :func:`source_split`); its stages are the cut points where features are cached or mixed. It is the
  library's (:mod:`hookmix.headonly.digits_source`, so that a loaded run rebuilds it) and named here too.
* target: :func:`digits_transfer` draws ``k`` labelled examples per class of digits 5-9 (relabelled
  0..4) for training and keeps every other 5-9 example for validation.

Images are returned as ``(B, 1, 8, 8)`` float32 tensors scaled to ``[0, 1]`` and labels as ``(B,)``
int64 tensors.
"""

from __future__ import annotations

from hookmix.core.checks import is_int
from hookmix.core.errors import UsageError
from hookmix.graph.models import DigitsCNN
from hookmix.headonly.digits_source import (
    TransferSplit,
    all_digits,
    check_seed,
    pretrain_source,
    single_thread,
    source_split,
    split_digits,
)

__all__ = [
    "all_digits",
    "check_seed",
    "DigitsCNN",
    "single_thread",
    "TransferSplit",
    "source_split",
    "pretrain_source",
    "digits_transfer",
    "MAX_SHOTS",
]

TARGET_CLASSES = (5, 6, 7, 8, 9)
MAX_SHOTS = 100
"""Largest ``k`` of :func:`digits_transfer`: leaves at least 74 validation examples of every class."""


def _check_shots(k: int) -> None:
    if not is_int(k, 1) or k > MAX_SHOTS:
        raise UsageError(
            f"k must be an int in [1, {MAX_SHOTS}] (labelled examples per class), got {k!r}; "
            f"the smallest class has 174 examples and the rest are kept for validation."
        )


def digits_transfer(k: int, seed: int) -> TransferSplit:
    """The few-shot target task: ``k`` training examples per class of digits 5-9, relabelled 0..4.

    ``train_x`` ``(5k, 1, 8, 8)`` holds exactly ``k`` examples of each class, drawn with a generator
    seeded by ``seed``; ``val_x`` holds every other 5-9 example (disjoint from training).
    """
    check_seed(seed)
    _check_shots(k)
    return split_digits(TARGET_CLASSES, k, seed)
