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

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from hookmix._checks import check_int, is_int
from hookmix._errors import UsageError
from hookmix._wrappers import unwrap
from hookmix.cache import MANIFEST_NAME, CacheKey, FeatureCache

__all__ = ["extract_sharded", "rank_and_world", "rank_seed", "unwrap"]

PARTS_DIR = ".parts"
"""Sub-directory of an :func:`extract_sharded` cache holding the per-rank parts until they are merged."""


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
    **options: Any,
) -> FeatureCache:
    """:meth:`FeatureCache.extract` with the dataset's rows split across the ranks of the default group.

    Call it on every rank. Rank r runs ``backbone`` over its contiguous block of about N / W rows into
    ``path/.parts/rows-<start>-<stop>`` (an ordinary cache: an interrupted extraction resumes when run
    again with the same world size); then rank 0 merges the blocks into one cache at ``path`` — the format
    :meth:`FeatureCache.load` and ``hookmix finetune --cache`` read — and removes ``.parts``, and every rank
    returns the whole cache (N rows). ``path`` must be readable by every rank (a shared file system across
    nodes). When ``path`` already holds a cache, every rank loads it (rank 0 first completes it if the merge
    was interrupted). Without a process group this is ``FeatureCache.extract``.

    Args:
        backbone: frozen module mapping ``(B, C, H, W)`` to ``(B, *F)``, on this rank's device.
        dataset: the whole map-style dataset (the same on every rank).
        key, dtype, views, shard_size: as in :meth:`FeatureCache.extract`.
        path: the cache directory.
        progress: show a tqdm bar (on rank 0 only).
        **options: other :meth:`FeatureCache.extract` arguments (``batch_size``, ``num_workers``, ``device``).
    """
    directory = Path(path)
    rank, world = rank_and_world()
    common = dict(dtype=dtype, views=views, shard_size=shard_size, **options)
    if world == 1:
        return FeatureCache.extract(backbone, dataset, key, path=directory, progress=progress, **common)
    if not (directory / MANIFEST_NAME).exists():
        _extract_parts_and_merge(backbone, dataset, key, directory, rank, world, progress, common)
    elif rank == 0:  # a complete cache is loaded; a merge that was interrupted is completed by rank 0
        FeatureCache.extract(backbone, dataset, key, path=directory, progress=progress, **common)
        shutil.rmtree(directory / PARTS_DIR, ignore_errors=True)
    dist.barrier()
    return FeatureCache.load(directory, key, dtype=dtype, views=views)


def _extract_parts_and_merge(
    backbone: nn.Module,
    dataset: Dataset,
    key: CacheKey,
    directory: Path,
    rank: int,
    world: int,
    progress: bool,
    common: dict[str, Any],
) -> None:
    """Each rank extracts its block of rows into ``directory/.parts``; rank 0 then writes the merged cache."""
    count = len(dataset)  # type: ignore[arg-type]
    if count < world:
        raise UsageError(f"dataset has {count} examples for {world} ranks; extract it without a process group.")
    blocks = _row_blocks(count, world)
    parts = [
        (directory / PARTS_DIR / f"rows-{start}-{stop}", replace(key, dataset=f"{key.dataset}[{start}:{stop}]"))
        for start, stop in blocks
    ]
    own_dir, own_key = parts[rank]
    FeatureCache.extract(
        backbone,
        Subset(dataset, range(*blocks[rank])),
        own_key,
        path=own_dir,
        progress=progress and rank == 0,
        **common,
    )
    dist.barrier()
    if rank == 0:
        dtype, views = common["dtype"], common["views"]
        loaded = [FeatureCache.load(part_dir, part_key, dtype=dtype, views=views) for part_dir, part_key in parts]
        merged = FeatureCache(
            torch.cat([part.features for part in loaded], dim=1), torch.cat([part.labels for part in loaded]), key
        )
        merged.save(directory, shard_size=common["shard_size"])
        shutil.rmtree(directory / PARTS_DIR)
