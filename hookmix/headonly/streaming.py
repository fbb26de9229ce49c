"""Training on a feature cache larger than memory: shards memory-mapped, read in shuffled blocks.

A cache on disk (:mod:`hookmix.headonly._cache_format`) is a list of shards, each a contiguous range of rows. An
epoch over a :class:`ShardedFeatures` (``FeatureCache.load(path, key, mmap=True).features``) reads
*blocks* of shards: the shards are permuted, cut into blocks of ``shards_per_block``, and the rows of each
block are visited in a shuffled order (:meth:`BlockLayout.order`). Background threads (:data:`READERS`)
map and checksum the next block's shards in parallel while the current block trains, and a block is
unmapped as soon as its last row has been used, so at most two blocks (plus one batch) are resident: the
memory an epoch needs is set by the block size, not by the cache size. A shard whose sha256 does not
match is refused when its block is read — mid-epoch, before any of its rows reaches a step.

Where the rows are gathered (:meth:`ShardedFeatures.batches`): on the host, copied out of the mapped shards
(training on the CPU); or on the training device, where each block is copied whole, once, and a batch is one
``index_select`` per block it spans — on CUDA through pinned staging buffers on a side stream, so that the copies
overlap the compute and no step waits on the host (``benchmarks/bench_gpu.py`` measures it).

Memory maps were measured against ``readinto`` into reused buffers (``benchmarks/cache_stream.py``, 6 GB,
H200 machine): the same epoch time within the machines' spread, the same peak RSS; the maps stay.

The order is a pure function of the generator and the layout, so :func:`hookmix.fit` given the
same layout trains the same steps on the in-memory tensors as on the streamed cache.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hookmix.core.checks import check_int, is_int
from hookmix.core.errors import UsageError
from hookmix.headonly._cache_format import Manifest, map_shard, peek_labels
from hookmix.headonly.store import Store, open_store

__all__ = ["BlockLayout", "BLOCK_BYTES", "default_memory_budget", "EpochOrder", "READERS", "ShardedFeatures"]

READERS = 4
"""Threads that read (map and checksum) the shards of the next block in parallel."""

STAGING_BYTES = 32 * 2**20
"""Size of one pinned buffer a shard passes through on its way to a CUDA device (:meth:`ShardedFeatures.batches`)."""

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
    """The features ``(V, N, *F)`` of a stored cache, left on disk (or in object storage) and read shard by shard.

    What ``FeatureCache.load(path, key, mmap=True).features`` holds, and what :func:`hookmix.fit`
    streams: pass it as ``train_inputs``. It has the ``shape``, ``dtype`` and ``ndim`` of the tensor it
    stands for; its rows are read through :meth:`batches` (one epoch, in the order of an :class:`EpochOrder`).
    Every shard's size and header are checked when it is opened; its checksum when its block is read (a shard in
    object storage as its bytes stream into a local temp file, which is then mapped: :mod:`hookmix.headonly.store`).
    """

    def __init__(self, directory: Path | Store, manifest: Manifest) -> None:
        if not manifest.complete:
            raise UsageError(f"the feature cache in {directory} is incomplete; resume its extraction first.")
        self.directory = open_store(directory)
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

    def batches(
        self,
        epoch_order: EpochOrder,
        view: torch.Tensor,
        batch_size: int,
        device: torch.device | str | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the batches ``(B, *F)`` of one epoch (of one rank's shards under DDP: :meth:`BlockLayout.order`):
        rows ``epoch_order.order[i : i + batch_size]``, row ``r``
        from view ``view[r]`` (``view``: ``(N,)``), exactly as ``features[view[idx], idx]`` of the in-memory tensor.

        The blocks are read in ``epoch_order.blocks`` order, one block ahead, by :data:`READERS` background
        threads (the shards of a block in parallel: the disk reads one while another is hashed); a block is released
        once the epoch has moved past its rows, so at most two are resident at a time.

        ``device``: ``None`` — the rows are gathered on the host from the mapped shards, batches on the CPU; a
        CUDA device (or the CPU) — each block is copied there whole, once, and the rows gathered there: batches on
        ``device``, the same values (on CUDA through pinned staging buffers, on a side stream that overlaps the
        copies with the compute: no step waits on the host). ``fit`` on a CUDA device streams this way.
        """
        if device is not None and torch.device(device).type not in ("cpu", "cuda"):
            raise UsageError(f"device={device!r}: rows are gathered on the host (None), the CPU or a CUDA device.")
        listed = [s for block in epoch_order.blocks for s in block]
        if len(set(listed)) != len(listed) or not set(listed) <= set(range(len(self.stops))):
            raise UsageError(
                f"epoch_order.blocks={epoch_order.blocks} do not list shards of this cache's {len(self.stops)} "
                "at most once each."
            )
        rows = _EpochRows.build(self, epoch_order, view)
        gather = _HostGather(self, rows) if device is None else _DeviceGather(self, rows, torch.device(device))
        resident: deque[int] = deque()  # the blocks read now, in visiting order
        pending: deque[tuple[int, list[Future[Any]]]] = deque()
        n, queued = len(epoch_order.order), 0
        with ThreadPoolExecutor(READERS, thread_name_prefix="hookmix-read") as pool:

            def prefetch(needed: bool = False) -> None:
                nonlocal queued
                if queued < len(rows.blocks) and (needed or len(resident) + len(pending) < 2):
                    pending.append((queued, gather.read(pool, queued)))
                    queued += 1

            prefetch()
            for begin in range(0, n, batch_size):
                end = min(begin + batch_size, n)
                while not resident or rows.block_ends[resident[-1]] < end:  # a batch may span several blocks
                    if not pending:
                        prefetch(needed=True)
                    block = pending[0][0]
                    gather.ready(*pending.popleft())  # a bad checksum raises here
                    # the reads' futures are not kept in a local: they hold the block's mappings past its release
                    resident.append(block)
                    prefetch()
                yield gather.rows(begin, end, resident)
                while resident and rows.block_ends[resident[0]] <= end:
                    gather.release(resident.popleft())  # its last reference: a mapped shard is unmapped here
                    prefetch()

    def _map_shard(self, index: int) -> torch.Tensor:
        """Map and verify shard ``index``: its features ``(V * n, *F)``, a view of the mapping."""
        return map_shard(self.directory, self.manifest.shards[index], self.manifest)[0].flatten(0, 1)


@dataclass(frozen=True)
class _EpochRows:
    """Where each position of an epoch's order is stored: ``shard[i]`` and ``row[i]``, the row of that shard's
    features ``(V * n, *F)`` (view-major); ``blocks`` the shards of each block and ``block_ends`` the position
    after each block's last row."""

    shard: torch.Tensor
    row: torch.Tensor
    blocks: tuple[tuple[int, ...], ...]
    block_ends: tuple[int, ...]
    sizes: tuple[int, ...]

    @classmethod
    def build(cls, features: ShardedFeatures, epoch_order: EpochOrder, view: torch.Tensor) -> _EpochRows:
        starts = torch.tensor((0, *features.stops[:-1]))
        stops = torch.tensor(features.stops)
        order = epoch_order.order
        shard = torch.searchsorted(stops, order, right=True)
        row = order - starts[shard] + view[order] * (stops - starts)[shard]
        sizes = tuple(b - a for a, b in zip((0, *features.stops[:-1]), features.stops))
        ends = torch.tensor([sum(sizes[s] for s in block) for block in epoch_order.blocks]).cumsum(0).tolist()
        return cls(shard, row, epoch_order.blocks, tuple(ends), sizes)

    def span(self, block: int, begin: int, end: int) -> tuple[int, int]:
        """The positions of ``[begin, end)`` that lie in ``block`` (an empty range when none)."""
        first = self.block_ends[block - 1] if block else 0
        return max(begin, first), min(end, self.block_ends[block])


class _HostGather:
    """Rows gathered on the host: a block is its shards' mappings, a batch is copied out of them by numpy."""

    def __init__(self, features: ShardedFeatures, rows: _EpochRows) -> None:
        self.features, self.epoch = features, rows
        self.mapped: dict[int, np.ndarray] = {}  # shard -> features (V * n, *F) as same-width ints (no bfloat16)

    def read(self, pool: ThreadPoolExecutor, block: int) -> list[Future[Any]]:
        return [pool.submit(self._read_shard, shard) for shard in self.epoch.blocks[block]]

    def _read_shard(self, shard: int) -> tuple[int, np.ndarray]:
        features = self.features._map_shard(shard)
        return shard, features.view(_same_width(features.dtype)).numpy()

    def ready(self, block: int, reads: list[Future[Any]]) -> None:
        self.mapped.update(read.result() for read in reads)

    def release(self, block: int) -> None:
        for shard in self.epoch.blocks[block]:
            del self.mapped[shard]

    def rows(self, begin: int, end: int, resident: Sequence[int]) -> torch.Tensor:
        shard_of, rows = self.epoch.shard[begin:end], self.epoch.row[begin:end]
        out = torch.empty((end - begin, *self.features.shape[2:]), dtype=self.features.dtype)
        rows_out = out.view(_same_width(out.dtype)).numpy()  # numpy copies whole rows: 4x torch's gather
        for shard in shard_of.unique().tolist():
            at = (shard_of == shard).nonzero().squeeze(1)
            rows_out[at.numpy()] = np.take(self.mapped[shard], rows[at].numpy(), axis=0)
        return out


class _DeviceGather:
    """Rows gathered on ``device``: a block is one tensor there holding its shards' features one after the other,
    filled once by the reader threads; a batch is one ``index_select`` per block it spans.

    On CUDA each shard goes through pinned staging buffers of :data:`STAGING_BYTES` into the block, copied on a
    side stream; the compute stream waits for those copies on the device (an event), never on the host.
    """

    def __init__(self, features: ShardedFeatures, rows: _EpochRows, device: torch.device) -> None:
        self.features, self.epoch, self.device = features, rows, device
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        views = features.shape[0]
        offsets = torch.zeros(len(rows.sizes), dtype=torch.long)  # where each shard starts in its block's tensor
        for block in rows.blocks:
            sizes = torch.tensor([views * rows.sizes[s] for s in block])
            offsets[list(block)] = sizes.cumsum(0) - sizes
        local = offsets[rows.shard] + rows.row  # each position's row in its block's tensor
        self.local = local.pin_memory().to(device, non_blocking=True) if self.side is not None else local.to(device)
        self.loaded: dict[int, torch.Tensor] = {}

    def read(self, pool: ThreadPoolExecutor, block: int) -> list[Future[Any]]:
        shards = self.epoch.blocks[block]
        sizes = [self.features.shape[0] * self.epoch.sizes[s] for s in shards]
        tensor = torch.empty((sum(sizes), *self.features.shape[2:]), dtype=self.features.dtype, device=self.device)
        if self.side is not None:  # its memory may have held a released block that queued gathers still read
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            tensor.record_stream(self.side)
        self.loaded[block] = tensor
        return [pool.submit(self._copy_shard, s, part) for s, part in zip(shards, tensor.split(sizes))]

    def _copy_shard(self, shard: int, part: torch.Tensor) -> torch.cuda.Event | None:
        """Map and verify ``shard``, copy it into ``part`` (its rows of the block's tensor) through staging buffers:
        on CUDA pinned ones, copied on the side stream; the event that marks the end of its copies."""
        features = self.features._map_shard(shard)
        with torch.cuda.stream(self.side) if self.side is not None else nullcontext():
            for start, staging in _staged(features, pin_memory=self.side is not None):
                part[start : start + len(staging)].copy_(staging, non_blocking=True)  # the buffer is reused after it
        return self.side.record_event() if self.side is not None else None

    def ready(self, block: int, reads: list[Future[Any]]) -> None:
        for read in reads:
            copied = read.result()
            if copied is not None:
                torch.cuda.current_stream(self.device).wait_event(copied)

    def release(self, block: int) -> None:
        del self.loaded[block]

    def rows(self, begin: int, end: int, resident: Sequence[int]) -> torch.Tensor:
        out = torch.empty((end - begin, *self.features.shape[2:]), dtype=self.features.dtype, device=self.device)
        for block in resident:
            first, last = self.epoch.span(block, begin, end)
            if first < last:
                torch.index_select(self.loaded[block], 0, self.local[first:last], out=out[first - begin : last - begin])
        return out


def _staged(features: torch.Tensor, pin_memory: bool) -> Iterator[tuple[int, torch.Tensor]]:
    """``features`` ``(R, *F)`` copied chunk by chunk into new (pinned) buffers of at most :data:`STAGING_BYTES`
    (at least one row): ``(first row, buffer)`` pairs. numpy copies: one memcpy without the GIL, where torch's copy
    would start a team of threads in each reader thread."""
    chunk = max(1, STAGING_BYTES // (features[0].numel() * features.element_size()))
    width = _same_width(features.dtype)
    source = features.view(width).numpy()
    for start in range(0, len(features), chunk):
        staging = torch.empty(features[start : start + chunk].shape, dtype=features.dtype, pin_memory=pin_memory)
        np.copyto(staging.view(width).numpy(), source[start : start + chunk])
        yield start, staging


def _same_width(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
