"""hookmix under ``torch.distributed``: the ranks of a ``torchrun`` job, one plan stream per rank, feature
extraction shared by the ranks, and the rule that decides whether a head is worth training with DDP.

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

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from hookmix.core.checks import check_int, is_int
from hookmix.core.devices import place_module
from hookmix.core.errors import RankFailed, UsageError
from hookmix.core.wrappers import unwrap
from hookmix.headonly._backbone_pass import run_backbone
from hookmix.headonly._cache_format import (
    MANIFEST_NAME,
    Manifest,
    ShardWriter,
    check_consistent,
    check_request,
    map_shard,
)
from hookmix.headonly.cache import CacheKey, FeatureCache, check_extract_args
from hookmix.headonly.store import Store, open_store

__all__ = [
    "GROUP_TIMEOUT",
    "Ranks",
    "extract_sharded",
    "gather_or_fail",
    "launched_world",
    "phase",
    "process_group",
    "rank_and_world",
    "rank_seed",
    "shard_entry_name",
    "unwrap",
]

GROUP_TIMEOUT = timedelta(minutes=30)
"""How long a collective waits for the other ranks before it fails (the slowest rank's share of an extraction
must fit in it); a rank that hangs is then reported instead of holding the job forever."""

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in its job: ``rank`` of ``world`` processes (``local_rank`` on its node), and
    the backend of the process group (``None``: one process, no group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def leader(self) -> bool:
        """Rank 0: the rank that prints, writes the run and the cache manifest."""
        return self.rank == 0


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world() -> int:
    """How many processes this one runs among: the size of the initialised default group, else torchrun's
    ``WORLD_SIZE`` (1 without torchrun). Known before the group is joined, so a job can refuse what its ranks
    could not share before it waits for them."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    if not text.isdigit():
        raise UsageError(f"the environment variable {name}={text!r} is not a non-negative int (set by torchrun).")
    return int(text)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[tuple[Ranks, torch.device]]:
    """Join the process group ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) for the ``with`` block, and leave it at the end, also on an error.

    Yields this process's :class:`Ranks` and its device: on CUDA the GPU ``LOCAL_RANK`` with the ``nccl``
    backend, else ``device`` with ``gloo``. Without torchrun (no ``WORLD_SIZE``, or 1) it yields one process and
    ``device`` unchanged; a group the caller already initialised is used and left to the caller.
    """
    if dist.is_initialized():
        yield Ranks(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dist.get_backend()), device
        return
    if launched_world() == 1:
        yield Ranks(), device
        return
    local = _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=GROUP_TIMEOUT)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), local, backend), device
    finally:
        leave_group()


def leave_group() -> None:
    """Destroy the default process group if one is initialised (a rank that has no more collectives to run)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_or_fail(step: Callable[[], T]) -> list[T]:
    """Run ``step`` on this rank and return every rank's result, by rank: a point where the ranks meet, called
    by every rank (it returns once all have run their step). When ``step`` raised on some rank, that rank raises
    its own error and every other rank raises :class:`~hookmix.core.errors.RankFailed` naming the first rank that
    failed, so each rank ends with one error instead of dying inside the next collective ("Connection closed by
    peer"). ``step`` must run no collective, and its result must be small (it is pickled to every rank). Without
    a process group (or with one rank) it is ``[step()]``."""
    rank, world = rank_and_world()
    if world == 1:
        return [step()]
    error: Exception | None = None
    try:
        outcome: tuple[bool, Any] = (True, step())
    except Exception as exc:  # any error: a rank must not leave the others waiting in a collective
        error, outcome = exc, (False, isinstance(exc, (UsageError, FileNotFoundError)))
    outcomes: list[tuple[bool, Any]] = [(True, None)] * world
    dist.all_gather_object(outcomes, outcome)
    if error is not None:
        raise error
    failed = [(index, usage) for index, (ok, usage) in enumerate(outcomes) if not ok]
    if failed:
        raise RankFailed(failed[0][0], rank, world, failed[0][1])
    return [value for _, value in outcomes]


def phase(step: Callable[[], T]) -> T:
    """:func:`gather_or_fail` for a step whose result stays on its rank (a model, a dataset): only whether each
    rank failed travels. Returns this rank's result."""
    kept: list[T] = []
    gather_or_fail(lambda: kept.append(step()))
    return kept[0]


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


def shard_entry_name(index: int) -> str:
    """The hidden one-shard manifest a rank writes beside shard ``index`` of a sharded extraction, until rank 0
    writes the cache's manifest (``.shard-00007.json``)."""
    return f".shard-{index:05d}.json"


def shard_rows(count: int, shard_size: int) -> list[tuple[int, int]]:
    """The rows ``(start, stop)`` of each shard: shard i holds ``[i·S, min((i+1)·S, N))``, whatever the world
    size, so a resumed extraction may run on another number of ranks and one process writes the same layout."""
    return [(start, min(start + shard_size, count)) for start in range(0, count, shard_size)]


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
    load: bool = True,
    **options: Any,
) -> FeatureCache | None:
    """:meth:`FeatureCache.extract` with the shards split across the ranks of the default process group.

    Call it on every rank. Shard i holds rows ``[i·S, min((i+1)·S, N))`` (:func:`shard_rows`), the layout one
    process writes with the same ``shard_size``: the same bytes, whatever the number of ranks (each row's views are
    drawn under seeds of the row and the view, :mod:`hookmix.headonly.view_seeds`, whichever rank reads it). The
    ranks first check what an earlier, interrupted run left (each listed shard's sha256, the checks split across the
    ranks); then rank r runs ``backbone`` over every W-th missing or damaged shard, writing each shard under its
    final name and then its one-shard manifest (:func:`shard_entry_name`). No features travel between ranks. Once
    every rank has finished, rank 0 writes the cache's manifest (no shard is read) and removes the entries; every
    rank then returns the whole cache (N rows), loaded or memory-mapped per ``mmap`` — or ``None`` with
    ``load=False``, for a rank that will not read the features (from object storage, each load is a download). A
    rank that dies leaves no manifest — never a cache that looks complete — and the next run, on any number of
    ranks (or an interrupted one-process cache of the same shard size), redoes only the missing and damaged shards.
    An error on one rank (a user's mistake: an entry of another cache; a store that refused a request) is raised
    there and makes the other ranks raise :class:`~hookmix.core.errors.RankFailed` where the ranks next meet
    (:func:`gather_or_fail`), so no rank dies waiting for it.

    ``path`` is reached by every rank: a directory on a shared file system, whose writer lock rank 0 holds
    throughout (a one-process extraction of it waits), or a prefix in object storage (``s3://bucket/prefix``,
    any fsspec URL: :mod:`hookmix.headonly.store`), where each rank PUTs its own shards and entries and rank 0
    publishes the manifest once (write-once). Object storage has no lock: two jobs must not extract into one
    prefix at the same time. Without a process group (or with one rank) this is ``FeatureCache.extract``.

    Args:
        backbone: frozen module mapping ``(B, C, H, W)`` to ``(B, *F)``, on this rank's device.
        dataset: the whole map-style dataset (the same on every rank).
        key, dtype, views, shard_size, mmap, memory_budget: as in :meth:`FeatureCache.extract`.
        path: the cache's directory or URL, the same on every rank.
        progress: show a tqdm bar (on rank 0 only).
        load: load the cache on this rank once it is complete (``False``: return ``None``; the rank still takes
            part in the extraction).
        **options: other :meth:`FeatureCache.extract` arguments (``batch_size``, ``num_workers``, ``device``).
    """
    rank, world = rank_and_world()
    stored = dict(dtype=dtype, views=views, mmap=mmap, memory_budget=memory_budget)
    if world == 1:
        return FeatureCache.extract(
            backbone, dataset, key, path=path, progress=progress, shard_size=shard_size, **stored, **options
        )
    run = dict(batch_size=64, num_workers=0, device=None) | options | dict(dtype=dtype, views=views)
    check_extract_args(backbone, dataset, key, dtype, run["batch_size"], shard_size, views, run["num_workers"])
    store = open_store(path)
    with contextlib.ExitStack() as held:
        # every rank starts once rank 0 holds the lock, and goes by rank 0's finding (one manifest, one answer)
        complete = gather_or_fail(lambda: _start(store, held, rank == 0))[0]
        batches = 0
        if not complete:
            request = dict(dtype=dtype, views=views, count=len(dataset))  # type: ignore[arg-type]
            layout = shard_rows(len(dataset), check_int("shard_size", shard_size, 1))  # type: ignore[arg-type]
            done = _verified(store, key, layout, request)
            mine = [i for i in range(len(layout)) if i not in done][rank::world]
            work = (backbone, dataset, key, store, layout, mine, progress and rank == 0, run)
            batches = sum(gather_or_fail(lambda: _extract_shards(*work)))
            gather_or_fail(lambda: _publish(store, layout) if rank == 0 else None)  # before any rank loads it
    cache = phase(lambda: FeatureCache.load(store, key, **stored) if load else None)
    if cache is not None:
        cache.batches_run = batches
        cache.rows_reused = len(cache) if batches == 0 else 0
    return cache


def _start(store: Store, held: contextlib.ExitStack, leader: bool) -> bool | None:
    """Prepare ``store``; on rank 0 (``leader``) also take its writer lock into ``held`` and say whether the
    cache is complete already (``None`` on the other ranks)."""
    store.prepare()
    if not leader:
        return None
    held.enter_context(store.lock())
    return _complete(store)


def _complete(store: Store) -> bool:
    """Whether ``store`` holds a complete manifest (a damaged one is left to ``FeatureCache.load`` to report)."""
    try:
        return Manifest.read(store, CacheKey).complete
    except UsageError:
        return False


def _entries(store: Store, layout: list[tuple[int, int]]) -> dict[int, Manifest]:
    """The one-shard manifests of shards written so far: the ranks' entries, and the shards of an interrupted
    one-process manifest with the same layout; an entry that cannot be read, or of another layout, is left out."""
    found: dict[int, Manifest] = {}
    names = store.names()
    if MANIFEST_NAME in names:
        try:
            partial = Manifest.read(store, CacheKey)
        except UsageError:
            partial = None
        for index, shard in enumerate(partial.shards if partial is not None else ()):
            if index < len(layout) and (shard.start, shard.stop) == layout[index]:
                found[index] = replace(partial, shards=(shard,))  # type: ignore[arg-type]
    for index, (start, stop) in enumerate(layout):
        if shard_entry_name(index) in names:
            try:
                entry = Manifest.read(store, CacheKey, shard_entry_name(index), index, start)
            except UsageError:
                continue
            if entry.rows_done == stop and len(entry.shards) == 1:
                found[index] = entry
    return found


def _verified(store: Store, key: CacheKey, layout: list[tuple[int, int]], request: dict[str, Any]) -> set[int]:
    """The shards written by an earlier run whose bytes match their sha256: each rank checks every W-th entry,
    and the ranks share their findings. An entry of another key, dtype or views is refused (another cache)."""
    rank, world = rank_and_world()

    def check_mine() -> list[int]:
        entries, good = _entries(store, layout), []
        for index in sorted(entries)[rank::world]:
            check_request(entries[index], store, key, **request)
            try:
                map_shard(store, entries[index].shards[0], entries[index])
            except UsageError:  # missing, truncated or altered: extracted again
                continue
            good.append(index)
        return good

    return {index for part in gather_or_fail(check_mine) for index in part}


def _extract_shards(
    backbone: nn.Module,
    dataset: Dataset,
    key: CacheKey,
    store: Store,
    layout: list[tuple[int, int]],
    mine: list[int],
    progress: bool,
    run: dict[str, Any],
) -> int:
    """Extract shards ``mine`` (one DataLoader for all of them), each written with its one-shard manifest;
    the number of batches the backbone ran. ``run``: the options of
    :func:`~hookmix.headonly._backbone_pass.run_backbone`."""
    if not mine:
        return 0
    count, index_of = len(dataset), {layout[i][0]: i for i in mine}  # type: ignore[arg-type]

    def write(start: int, stop: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        index = index_of[start]
        entry = shard_entry_name(index)
        writer = ShardWriter(
            store, key, run["dtype"], run["views"], count, None, first_shard=index, manifest_name=entry
        )
        writer(start, stop, features, labels)

    device = place_module(backbone, run["device"])
    options = run | {"device": device}
    ranges = [layout[i] for i in mine]
    return run_backbone(backbone, dataset, ranges, {"features": write}, progress=progress, **options)


def _publish(store: Store, layout: list[tuple[int, int]]) -> None:
    """Rank 0, after every rank finished: the cache's manifest from the shards' entries (no shard is read),
    published last; then the entries (and an interrupted one-process run's progress record) are removed."""
    entries = _entries(store, layout)
    missing = [index for index in range(len(layout)) if index not in entries]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} of {store} were not written although every rank finished.")
    first = entries[0]
    for index in range(1, len(layout)):
        check_consistent(first, entries[index], store)
    merged = replace(first, shards=tuple(entries[index].shards[0] for index in range(len(layout))))
    store.publish(MANIFEST_NAME, merged.to_json(), complete=True)
    for index in range(len(layout)):
        store.discard(shard_entry_name(index))
