"""The embedded digits source: scikit-learn's bundled digits and the small CNN pretrained on digits 0-4.

Head-only fine-tuning starts from a frozen backbone pretrained on *other* classes. This module holds that
backbone for the offline demo and tests: :func:`pretrain_source` trains :class:`~hookmix.graph.models.DigitsCNN`
on digits 0-4 (the fixed training part of :func:`source_split`), seeded, in about a second. It lives in the
library so that a run recorded as "the digits CNN pretrained from seed s" can be rebuilt by
:func:`hookmix.load_finetuned` like any torchvision or timm backbone; the target tasks drawn from digits 5-9
are the app's (:mod:`hookmix.app.digits`).

Images are ``(B, 1, 8, 8)`` float32 tensors scaled to ``[0, 1]`` (pixel values 0..16 / 16), labels ``(B,)``
int64 tensors.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hookmix.core.checks import is_int
from hookmix.core.errors import UsageError
from hookmix.graph.models import DigitsCNN

__all__ = [
    "SOURCE_CLASSES",
    "TransferSplit",
    "all_digits",
    "check_seed",
    "pretrain_source",
    "single_thread",
    "source_split",
    "split_digits",
]

SOURCE_CLASSES = (0, 1, 2, 3, 4)
_SPLIT_SEED = 20240601
_SOURCE_TRAIN_FRACTION = 0.8
_PIXEL_MAX = 16.0
_SOURCE_STATES: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
"""Trained source weights per ``(seed, epochs)``, so the demo and the tests train each model once."""


@dataclass(frozen=True, eq=False)
class TransferSplit:
    """A labelled train/validation split of digit images.

    ``train_x`` ``(N, 1, H, W)`` / ``train_y`` and ``val_x`` ``(M, 1, H, W)`` / ``val_y`` hold images in
    ``[0, 1]`` and their labels: ``(N,)`` class indices ``0..len(class_names) - 1`` for single digits
    (8x8), or ``(N, L)`` float multi-hot rows for mosaics (16x16, :mod:`hookmix.app.mosaics`);
    ``class_names[i]`` is the digit that label ``i`` stands for.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)


@functools.lru_cache(maxsize=1)
def all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images ``(1797, 1, 8, 8)`` in ``[0, 1]`` and labels ``(1797,)`` (read-only: index it)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits task needs scikit-learn (its bundled load_digits data); pip install hookmix[data]"
        ) from error
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / _PIXEL_MAX
    return images, torch.as_tensor(bunch.target, dtype=torch.int64)


def split_digits(classes: tuple[int, ...], take: int | float, seed: int) -> TransferSplit:
    """Split the examples of ``classes`` (relabelled ``0..len(classes) - 1``) per class, with a seeded shuffle.

    ``take`` is the number (int) or fraction (float) of each class's examples that go to training.
    Both parts keep the dataset's order, so the split depends only on ``seed``.
    """
    images, labels = all_digits()
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for digit in classes:
        members = torch.nonzero(labels == digit).squeeze(1)
        shuffled = members[torch.randperm(len(members), generator=generator)]
        n_train = take if isinstance(take, int) else round(take * len(members))
        train_parts.append(shuffled[:n_train])
        val_parts.append(shuffled[n_train:])
    relabel = torch.full((10,), -1, dtype=torch.int64)
    relabel[list(classes)] = torch.arange(len(classes))
    train_idx = torch.cat(train_parts).sort().values
    val_idx = torch.cat(val_parts).sort().values
    return TransferSplit(
        train_x=images[train_idx],
        train_y=relabel[labels[train_idx]],
        val_x=images[val_idx],
        val_y=relabel[labels[val_idx]],
        class_names=tuple(str(digit) for digit in classes),
    )


def source_split() -> TransferSplit:
    """The fixed source task: digits 0-4, 80 % of each class for training, the rest held out."""
    return split_digits(SOURCE_CLASSES, _SOURCE_TRAIN_FRACTION, _SPLIT_SEED)


def check_seed(seed: int) -> None:
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}.")
    if not 0 <= seed < 2**63:
        raise UsageError(f"seed must lie in [0, 2**63), got {seed}; use a small non-negative int such as 0.")


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one CPU thread, restoring the thread count afterwards.

    For 8x8 images thread synchronisation costs more than it saves (10x slower on a busy 2-core
    machine), and one thread makes the float reductions, hence the weights, independent of core count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@single_thread()
def _train_source(seed: int, epochs: int, progress: bool) -> dict[str, torch.Tensor]:
    """Train a :class:`DigitsCNN` on the training part of :func:`source_split`; return its state dict."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN(num_classes=len(SOURCE_CLASSES))
    split = source_split()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in tqdm(range(epochs), desc="pretrain digits 0-4", disable=not progress):
        for batch in torch.randperm(len(split.train_y), generator=generator).split(64):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(split.train_x[batch]), split.train_y[batch]).backward()
            optimizer.step()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def pretrain_source(seed: int = 0, epochs: int = 10, progress: bool = False) -> DigitsCNN:
    """A :class:`DigitsCNN` trained on digits 0-4 (the training part of :func:`source_split`), in eval mode.

    Initialisation and shuffling depend only on ``seed`` (the global RNG is left untouched), so equal
    arguments give bitwise-equal weights. Training takes about a second and is cached per
    ``(seed, epochs)``: every call returns a fresh model, so fine-tuning it never alters the cache.
    """
    check_seed(seed)
    if not is_int(epochs, 1):
        raise UsageError(f"epochs must be a positive int, got {epochs!r}; the default 10 reaches > 95 %.")
    if (seed, epochs) not in _SOURCE_STATES:
        _SOURCE_STATES[seed, epochs] = _train_source(seed, epochs, progress)
    model = DigitsCNN(num_classes=len(SOURCE_CLASSES))
    model.load_state_dict(_SOURCE_STATES[seed, epochs])
    return model.eval()
