"""hookmix under ``torch.distributed``: one plan stream per rank, and feature extraction shared by the ranks.

Under ``DistributedDataParallel`` each of the W ranks runs its own :class:`~hookmix.HookMixer` on its own
B rows of the global batch. ``HookMixer(ddp_model, ...)`` hooks the module *inside* the wrapper (see
:func:`unwrap`): DDP's forward calls that module, so its hooks fire as in a single process.

Seeding (:func:`rank_seed`): by default rank r draws from ``seed + r``, so the ranks draw independent
λ and partners — the global batch is mixed as W independent groups of B rows. ``shared=True`` gives every
rank the same seed instead: with ``lam_mode="batch"`` the whole global batch then uses one λ per step,
as a single process with W·B rows would. Partners always stay within a rank: pairing rows of different
ranks would need the layer's activation all-gathered in the hook and its gradient sent back in backward
(one activation's worth of traffic per step, and a change to the hook), for no known gain in accuracy.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from hookmix.core.checks import check_int, is_int
from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write
from hookmix.core.wrappers import unwrap
from hookmix.headonly._cache_format import Manifest, check_consistent
from hookmix.headonly.cache import MANIFEST_NAME, CacheKey, FeatureCache, extract_rows

__all__ = ["extract_sharded", "rank_and_world", "rank_manifest_name", "rank_seed", "unwrap"]


def rank_manifest_name(rank: int, world: int) -> str:
    """The manifest one rank of an :func:`extract_sharded` run keeps of its own shards until rank 0 writes
    the cache's manifest (hidden: ``.rank-00001-of-00004.json``)."""
    return f".rank-{rank:05d}-of-{world:05d}.json"


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_seed(seed: int, *, rank: int | None = None, shared: bool = False) -> int:
    """The mixer seed of one rank: ``seed + rank`` (independent plans per rank), or ``seed`` if ``shared``.

    Args:
        seed: the run's base seed.
        rank: this process's global rank; ``None`` reads it from the default process group (0 without one).
        shared: give every rank the same plans (one λ for the global batch with ``lam_mode="batch"``).
    """
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}.")
    if rank is None:
        rank = rank_and_world()[0]
    else:
        check_int("rank", rank, 0, " (the process's global rank) or None")
    return seed if shared else seed + rank


def _row_blocks(count: int, world: int) -> list[tuple[int, int]]:
    """``world`` contiguous ``(start, stop)`` blocks covering ``count`` rows, sizes differing by at most 1."""
    return [(rank * count // world, (rank + 1) * count // world) for rank in range(world)]


def extract_sharded(
    backbone: nn.Module,
    dataset: Dataset,
    key: CacheKey,
    *,
    path: str | Path,
    dtype: torch.dtype = torch.float16,
    views: int = 1,
    shard_size: int = 1024,
    progress: bool = True,
    mmap: bool | None = False,
    memory_budget: int | None = None,
    **options: Any,
) -> FeatureCache:
    """:meth:`FeatureCache.extract` with the dataset's rows split across the ranks of the default group.

    Call it on every rank. Rank r runs ``backbone`` over its contiguous block of about N / W rows and writes
    them, one shard at a time, straight into ``path`` under their final names (its first shard number
    follows the shards of the ranks before it), keeping a manifest of its own shards
    (:func:`rank_manifest_name`); no features travel between ranks. After a barrier rank 0 writes the
    cache's manifest from those shard lists (names, rows, sizes, checksums: no shard is read) and removes
    them; every rank then returns the whole cache (N rows), loaded or memory-mapped per ``mmap``. The
    result is the format :meth:`FeatureCache.load` and ``hookmix finetune --cache`` read. ``path`` must be
    reachable by every rank (a shared file system across nodes). An interrupted run resumes each rank from
    its last complete shard when run again with the same world size; when ``path`` already holds a
    complete cache, every rank loads it. Without a process group this is ``FeatureCache.extract``.

    Args:
        backbone: frozen module mapping ``(B, C, H, W)`` to ``(B, *F)``, on this rank's device.
        dataset: the whole map-style dataset (the same on every rank).
        key, dtype, views, shard_size, mmap, memory_budget: as in :meth:`FeatureCache.extract`.
        path: the cache directory.
        progress: show a tqdm bar (on rank 0 only).
        **options: other :meth:`FeatureCache.extract` arguments (``batch_size``, ``num_workers``, ``device``).
    """
    directory = Path(path)
    rank, world = rank_and_world()
    common = dict(dtype=dtype, views=views, shard_size=shard_size, **options)
    stored = dict(dtype=dtype, views=views, mmap=mmap, memory_budget=memory_budget)
    if world == 1:
        return FeatureCache.extract(
            backbone, dataset, key, path=directory, progress=progress, **common, mmap=mmap, memory_budget=memory_budget
        )
    if not (directory / MANIFEST_NAME).exists():
        _extract_own_rows(backbone, dataset, key, directory, rank, world, progress and rank == 0, common)
        dist.barrier()
        if rank == 0:
            _write_manifest(directory, world, len(dataset))  # type: ignore[arg-type]
    dist.barrier()
    return FeatureCache.load(directory, key, **stored)


def _extract_own_rows(
    backbone: nn.Module,
    dataset: Dataset,
    key: CacheKey,
    directory: Path,
    rank: int,
    world: int,
    progress: bool,
    common: dict[str, Any],
) -> None:
    """Rank ``rank`` extracts its block of rows into its shards of ``directory``."""
    count = len(dataset)  # type: ignore[arg-type]
    if count < world:
        raise UsageError(f"dataset has {count} examples for {world} ranks; extract it without a process group.")
    shard_size = check_int("shard_size", common["shard_size"], 1)
    blocks = _row_blocks(count, world)
    first_shard = sum(math.ceil((stop - start) / shard_size) for start, stop in blocks[:rank])
    name = rank_manifest_name(rank, world)
    extract_rows(backbone, dataset, key, directory, blocks[rank], first_shard, name, progress=progress, **common)


def _write_manifest(directory: Path, world: int, count: int) -> None:
    """Rank 0: the cache's manifest from the ranks' shard lists (no shard is read), then remove those lists."""
    blocks = _row_blocks(count, world)
    parts, first_shard = [], 0
    for rank, (start, stop) in enumerate(blocks):
        part = Manifest.read(directory, CacheKey, rank_manifest_name(rank, world), first_shard, start)
        if part.rows_done != stop:
            raise UsageError(f"rank {rank} wrote rows {start}..{part.rows_done} of {start}..{stop} into {directory}.")
        if parts:
            check_consistent(parts[0], part, directory)
        parts.append(part)
        first_shard += len(part.shards)
    merged = replace(parts[0], shards=tuple(shard for part in parts for shard in part.shards))
    atomic_write(directory / MANIFEST_NAME, merged.to_json())
    for rank in range(world):
        (directory / rank_manifest_name(rank, world)).unlink()
