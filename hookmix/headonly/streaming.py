"""Training on a feature cache larger than memory: shards memory-mapped, read in shuffled blocks.

A cache on disk (:mod:`hookmix.headonly._cache_format`) is a list of shards, each a contiguous range of rows. An
epoch over a :class:`ShardedFeatures` (``FeatureCache.load(path, key, mmap=True).features``) reads
*blocks* of shards: the shards are permuted, cut into blocks of ``shards_per_block``, and the rows of each
block are visited in a shuffled order (:meth:`BlockLayout.order`). Background threads (:data:`READERS`)
map and checksum the next block's shards in parallel while the current block trains, and a block is
unmapped as soon as its last row has been used, so at most two blocks (plus one batch) are resident: the
memory an epoch needs is set by the block size, not by the cache size. A shard whose sha256 does not
match is refused when its block is read — mid-epoch, before any of its rows reaches a step.

Memory maps were measured against ``readinto`` into reused buffers (``benchmarks/cache_stream.py``, 6 GB,
H200 machine): the same epoch time within the machines' spread, the same peak RSS; the maps stay.

The order is a pure function of the generator and the layout, so :func:`hookmix.fit` given the
same layout trains the same steps on the in-memory tensors as on the streamed cache.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hookmix.core.checks import check_int, is_int
from hookmix.core.errors import UsageError
from hookmix.headonly._cache_format import Manifest, map_shard, peek_labels

__all__ = ["BlockLayout", "BLOCK_BYTES", "default_memory_budget", "EpochOrder", "READERS", "ShardedFeatures"]

READERS = 4
"""Threads that read (map and checksum) the shards of the next block in parallel."""

BLOCK_BYTES = 512 * 2**20
"""Default size of one block of shards read together (:meth:`ShardedFeatures.layout`): two blocks are
resident at a time, so a streamed epoch holds about 1 GiB of features whatever the cache size."""


def default_memory_budget() -> int:
    """Half of the memory available now (``MemAvailable`` of ``/proc/meminfo``; free pages elsewhere), in bytes.

    The default above which ``FeatureCache.load(..., mmap=None)`` streams a cache instead of loading it.
    """
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


@dataclass(frozen=True)
class EpochOrder:
    """One epoch's order: ``order`` ``(N,)`` row indices, and the shard indices of each block in the order
    they are visited (the rows of ``blocks[0]`` come first in ``order``, then those of ``blocks[1]``, ...)."""

    order: torch.Tensor
    blocks: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class BlockLayout:
    """How an epoch groups the rows: shards ending at ``stops`` (row ``stops[i-1]`` to ``stops[i]``, the
    first from 0) visited ``shards_per_block`` at a time.

    Args:
        stops: the end row of each shard, increasing; the last one is the number of rows N.
        shards_per_block: shards read together; a block's rows are shuffled among themselves.
    """

    stops: tuple[int, ...]
    shards_per_block: int

    def __post_init__(self) -> None:
        stops = tuple(self.stops) if isinstance(self.stops, (tuple, list)) else ()
        if not stops or not all(is_int(s, 1) for s in stops) or any(a >= b for a, b in zip(stops, stops[1:])):
            raise UsageError(
                f"stops={self.stops!r} must be increasing positive shard ends, e.g. (1024, 2048, 2500); "
                "take them from ShardedFeatures.stops."
            )
        object.__setattr__(self, "stops", stops)
        check_int("shards_per_block", self.shards_per_block, 1)

    @property
    def rows(self) -> int:
        return self.stops[-1]

    def order(self, generator: torch.Generator, rank: int = 0, world: int = 1) -> EpochOrder:
        """Draw one epoch: a permutation of the shards cut into blocks, then a permutation of each block's rows.

        A pure function of ``generator``'s state and the layout, so the in-memory and the streamed path of
        :func:`hookmix.fit` see the same order. With ``world`` > 1 the permuted shards are dealt to the ranks
        (rank r takes every W-th: ``shards[r::W]``, so ranks differ by at most one shard) and cut into blocks of
        that rank's own; ``rank``'s order comes back. Every rank draws every rank's permutations (``1 + blocks``
        in all), so the generator, seeded alike on every rank, stays shared; ``world=1`` is the plain order.
        """
        check_int("world", world, 1)
        check_int("rank", rank, 0, f" below world={world}")
        if rank >= world:
            raise UsageError(f"rank={rank} must be below world={world}.")
        starts = (0, *self.stops[:-1])
        shards = torch.randperm(len(self.stops), generator=generator).tolist()
        mine = EpochOrder(torch.zeros(0, dtype=torch.int64), ())
        for dealt in range(world):
            own = shards[dealt::world]
            blocks = tuple(tuple(own[i : i + self.shards_per_block]) for i in range(0, len(own), self.shards_per_block))
            parts = [torch.zeros(0, dtype=torch.int64)]
            for block in blocks:
                rows = torch.cat([torch.arange(starts[s], self.stops[s]) for s in block])
                parts.append(rows[torch.randperm(len(rows), generator=generator)])
            if dealt == rank:
                mine = EpochOrder(torch.cat(parts), blocks)
        return mine

    def fewest_rows(self, world: int) -> int:
        """The fewest rows one of ``world`` ranks can be dealt in an epoch (:meth:`order`): the sum of the
        ``shards // world`` smallest shards. DDP over a streamed cache trains that many rows per rank and epoch."""
        sizes = sorted(b - a for a, b in zip((0, *self.stops[:-1]), self.stops))
        return sum(sizes[: len(sizes) // check_int("world", world, 1)])


class ShardedFeatures:
    """The features ``(V, N, *F)`` of an on-disk cache, left on disk and read shard by shard.

    What ``FeatureCache.load(path, key, mmap=True).features`` holds, and what :func:`hookmix.fit`
    streams: pass it as ``train_inputs``. It has the ``shape``, ``dtype`` and ``ndim`` of the tensor it
    stands for; its rows are read through :meth:`batches` (one epoch, in the order of an :class:`EpochOrder`).
    Every shard's size and header are checked when it is opened; its checksum when its block is read.
    """

    def __init__(self, directory: Path, manifest: Manifest) -> None:
        if not manifest.complete:
            raise UsageError(f"the feature cache in {directory} is incomplete; resume its extraction first.")
        self.directory = Path(directory)
        self.manifest = manifest
        self.shape = torch.Size((manifest.views, manifest.count, *manifest.feature_shape))
        self.dtype = manifest.dtype
        self.stops = tuple(shard.stop for shard in manifest.shards)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the shard files on disk."""
        return self.manifest.stored_bytes

    def __repr__(self) -> str:
        shape, shards = tuple(self.shape), len(self.stops)
        return f"ShardedFeatures(shape={shape}, dtype={self.dtype}, shards={shards}, path={self.directory})"

    def labels(self) -> torch.Tensor:
        """All labels ``(N, ...)``, read from each shard without reading its features (checksums: see
        :func:`~hookmix.headonly._cache_format.peek_labels`)."""
        return torch.cat([peek_labels(self.directory, shard, self.manifest) for shard in self.manifest.shards])

    def layout(self, shards_per_block: int | None = None) -> BlockLayout:
        """The :class:`BlockLayout` of this cache's shards; ``None``: as many shards per block as fit in
        :data:`BLOCK_BYTES` (at least one)."""
        if shards_per_block is None:
            per_shard = max(shard.bytes for shard in self.manifest.shards)
            shards_per_block = max(1, BLOCK_BYTES // per_shard)
        return BlockLayout(self.stops, shards_per_block)

    def batches(self, epoch_order: EpochOrder, view: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        """Yield the batches ``(B, *F)`` of one epoch (of one rank's shards under DDP: :meth:`BlockLayout.order`):
        rows ``epoch_order.order[i : i + batch_size]``, row ``r``
        from view ``view[r]`` (``view``: ``(N,)``), exactly as ``features[view[idx], idx]`` of the in-memory tensor.

        The blocks are read in ``epoch_order.blocks`` order, one block ahead, by :data:`READERS` background
        threads (the shards of a block in parallel: the disk reads one while another is hashed); a block is released
        once the epoch has moved past its rows, so at most two are mapped at a time.
        """
        listed = [s for block in epoch_order.blocks for s in block]
        if len(set(listed)) != len(listed) or not set(listed) <= set(range(len(self.stops))):
            raise UsageError(
                f"epoch_order.blocks={epoch_order.blocks} do not list shards of this cache's {len(self.stops)} "
                "at most once each."
            )
        starts = torch.tensor((0, *self.stops[:-1]))
        stops = torch.tensor(self.stops)
        sizes = [sum(self.stops[s] - int(starts[s]) for s in block) for block in epoch_order.blocks]
        block_ends = torch.tensor(sizes).cumsum(0).tolist()
        mapped: dict[int, np.ndarray] = {}  # shard -> features (V * n, *F) as same-width ints, a view of its mapping
        resident: deque[int] = deque()  # the blocks mapped now, in visiting order
        pending: deque[tuple[int, list[tuple[int, Future[np.ndarray]]]]] = deque()
        n, queued = len(epoch_order.order), 0
        with ThreadPoolExecutor(READERS, thread_name_prefix="hookmix-read") as pool:

            def prefetch(needed: bool = False) -> None:
                nonlocal queued
                if queued < len(epoch_order.blocks) and (needed or len(resident) + len(pending) < 2):
                    reads = [(shard, pool.submit(self._read_shard, shard)) for shard in epoch_order.blocks[queued]]
                    pending.append((queued, reads))
                    queued += 1

            prefetch()
            for begin in range(0, n, batch_size):
                end = min(begin + batch_size, n)
                while not resident or block_ends[resident[-1]] < end:  # a batch may span several blocks
                    if not pending:
                        prefetch(needed=True)
                    block, reads = pending.popleft()
                    mapped.update((shard, read.result()) for shard, read in reads)  # a bad checksum raises here
                    resident.append(block)
                    prefetch()
                idx = epoch_order.order[begin:end]
                shard_of = torch.searchsorted(stops, idx, right=True)
                out = torch.empty((end - begin, *self.shape[2:]), dtype=self.dtype)
                rows_out = out.view(_same_width(self.dtype)).numpy()  # numpy copies whole rows: 4x torch's gather
                for shard in shard_of.unique().tolist():
                    at = (shard_of == shard).nonzero().squeeze(1)
                    rows = idx[at] - starts[shard] + view[idx[at]] * (stops[shard] - starts[shard])
                    rows_out[at.numpy()] = np.take(mapped[shard], rows.numpy(), axis=0)
                yield out
                while resident and block_ends[resident[0]] <= end:
                    for shard in epoch_order.blocks[resident.popleft()]:
                        del mapped[shard]  # its last reference: the file is unmapped here
                    prefetch()

    def _read_shard(self, index: int) -> np.ndarray:
        """Map and verify shard ``index``: its features ``(V * n, *F)`` as integers of the same width (numpy
        has no bfloat16), a view of the mapping."""
        features = map_shard(self.directory, self.manifest.shards[index], self.manifest)[0]
        return features.flatten(0, 1).view(_same_width(features.dtype)).numpy()


def _same_width(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
