"""Seeded views: every ``(row, view)`` of an extraction drawn under its own seed, so that cached augmented views are
the same bytes however the extraction is cut up, and the caller's random state is left as it was.

The views of a cache differ only through the dataset's own randomness: a random augmentation in its transform, which
draws from the global generators — torch's (torchvision's ``RandomResizedCrop``, ``RandomHorizontalFlip``),
Python's ``random`` (torchvision's ``RandomChoice`` / ``RandomOrder``, timm's crops and ``RandomErasing``) and
numpy's (timm's ``RandAugment``). Drawn from those as they stand, the views would depend on what ran before: the
batch size, the shard size, the DataLoader's workers, the rows a resumed extraction skips, the rank that extracts a
shard. :class:`SeededViews` instead seeds all three before each item, with :func:`view_seed` of the row and the view
alone, and restores them after each batch. A transform that draws from a source of its own (a ``torch.Generator``
it holds, a ``numpy.random.Generator``, CUDA's generator) is left to it.

No format version bump: caches written before drew their views from the global generators as they stood. They are
still valid caches of their key (model, layer, transform, rows: the draws were never part of it) holding a valid set
of augmented views, a cache of a deterministic transform (``--views 1``) is bitwise what this code writes, and a bump
would make every stored cache be extracted again to gain only reproducibility. An old interrupted cache resumes with
seeded draws for its missing shards; each shard is still a set of views of its rows.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SeededViews", "view_seed"]

_MASK32 = 0xFFFFFFFF
_SALT = 0x9E3779B9
"""XORed into the index before mixing: without it row 0 of view 0 would draw under seed 0 (the mixer maps 0 to 0),
the stream of every ``torch.manual_seed(0)`` in user code."""


def view_seed(row: int, view: int, rows: int) -> int:
    """The seed of view ``view`` of row ``row`` of a dataset of ``rows`` rows: a 32-bit int.

    The index ``view * rows + row`` (XORed with a fixed salt) goes through murmur3's 32-bit finalizer, a bijection, so
    two different ``(row, view)`` pairs never share a seed while ``view * rows + row < 2**32`` (past that, the index
    wraps modulo ``2**32``; 32 bits because torch's CPU generator keeps only the low 32 bits of a seed). View ``v`` of
    a row is therefore the same in a cache of any number of views, and neighbouring rows get unrelated seeds.
    """
    index = ((view * rows + row) & _MASK32) ^ _SALT
    index = ((index ^ (index >> 16)) * 0x85EBCA6B) & _MASK32
    index = ((index ^ (index >> 13)) * 0xC2B2AE35) & _MASK32
    return index ^ (index >> 16)


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Restore the CPU states of torch's, Python's and numpy's global generators when the block ends."""
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class SeededViews(Dataset):
    """``dataset`` indexed by ``(row, view)``: item ``(i, v)`` is ``dataset[i]`` drawn with the global generators
    (torch's CPU one, Python's ``random``, numpy's) seeded with :func:`view_seed` ``(i, v, len(dataset))``.

    An item is thus a function of ``(i, v)`` alone, in the main process or a DataLoader worker, whatever was drawn
    before; the generators' states are restored after each call, so the caller's draws are not disturbed. The
    DataLoader fetches a batch through :meth:`__getitems__`, which saves and restores the states once per batch
    and seeds them once per item: 12 to 20 µs per item in batches of 64 (``benchmarks/view_seeds.py``, CPU).
    """

    def __init__(self, dataset: Dataset, rows: int) -> None:
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, item: tuple[int, int]) -> Any:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list[Any]:
        with _global_rng_kept():
            return [self._draw(row, view) for row, view in items]

    def _draw(self, row: int, view: int) -> Any:
        seed = view_seed(row, view, self.rows)
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also seed every GPU
        random.seed(seed)
        np.random.seed(seed)
        return self.dataset[row]
