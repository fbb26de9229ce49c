"""Feature cache for head-only fine-tuning: run a frozen backbone once, train a head for many epochs.

With a frozen backbone, the features of layer L do not change between epochs, so
:meth:`FeatureCache.extract` runs the backbone ONCE over a dataset (eval mode, ``torch.no_grad()``,
a tqdm bar) and keeps its outputs; training a head for E epochs then costs about one backbone pass.
:meth:`FeatureCache.extract_many` fills several caches from one pass (e.g. two layers' features, with
:class:`hookmix.headonly.taps.LayerTaps`), each exactly the cache :meth:`~FeatureCache.extract` would make.
The pass itself is :mod:`hookmix.headonly._backbone_pass`.

Shapes: the backbone maps a batch ``(B, C, H, W)`` to features ``(B, *F)`` with one fixed ``F`` per
row, e.g. ``(B, 2048, 7, 7)`` or tokens ``(B, N, D)``. The cache holds ``features`` ``(V, N, *F)``
(``V`` views per example, 1 by default) and ``labels`` ``(N, ...)`` exactly as the dataset yields
them (``(N,)`` int64 class indices, ``(N, n_classes)`` float multi-label targets, ...).

Precision: features are stored as float16 by default, which halves memory and disk against float32
at a relative rounding error of at most 2**-11 (about 5e-4; budget ~1e-3 when comparing). Features
beyond float16's range (|x| > 65504) are refused rather than stored as inf; pass
``dtype=torch.float32`` (bitwise equal to the backbone's output) or ``torch.bfloat16`` then.

On disk (``path=...``) a cache is a directory of safetensors shards and a JSON manifest, written shard by
shard (extraction holds one shard at a time) and read back only after checking every shard
(:mod:`hookmix.headonly._cache_format`); ``path`` may also be a URL, the same files under a prefix in object
storage (``s3://bucket/prefix``, :mod:`hookmix.headonly.store`). A cache larger than memory is not loaded but
memory-mapped (``load(..., mmap=True)``, or ``mmap=None``: when it exceeds a memory budget): its ``features`` are then a
:class:`hookmix.headonly.streaming.ShardedFeatures` that :func:`hookmix.fit` streams block by block.

A stored cache serves only the :class:`CacheKey` it was built for, whose ``dataset`` names the rows' identity
(:mod:`hookmix.headonly.dataset_identity`); :func:`keyed_directory` gives every key its own directory under one root.
Writers hold the directory's lock (object storage has none: a shard is written once, the manifest published
once) and never rewrite a published shard, so processes may share a directory:
a second writer of the same key waits and then reads the first one's cache (:attr:`FeatureCache.reused`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
from collections.abc import Callable, Mapping, Sized
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hookmix.core.checks import check_int, is_int
from hookmix.core.devices import place_module
from hookmix.core.errors import UsageError
from hookmix.headonly._backbone_pass import Regroup, pass_ranges, run_backbone
from hookmix.headonly._cache_format import (
    FEATURE_DTYPES,
    MANIFEST_NAME,
    Manifest,
    ShardWriter,
    Sink,
    bytes_per_example,
    check_request,
    dtype_name,
    read_shard,
    read_shards,
)
from hookmix.headonly.store import Store, join, open_store
from hookmix.headonly.streaming import ShardedFeatures, default_memory_budget

__all__ = [
    "bytes_per_example",
    "CacheKey",
    "check_extract_args",
    "FeatureCache",
    "keyed_directory",
    "transform_fingerprint",
    "FEATURE_DTYPES",
    "MANIFEST_NAME",
]


def transform_fingerprint(transform: object) -> str:
    """A short, stable fingerprint of a preprocessing transform, for :attr:`CacheKey.transform`.

    It hashes ``repr(transform)`` with memory addresses (``at 0x7f...``) removed, so it changes when
    a torchvision / timm transform's parameters change (their reprs list them) but not between runs.
    A plain function's repr is only its name: rename it, or pass your own version string as
    ``CacheKey.transform``, when you change its code. ``None`` (no transform) gives ``"none"``.
    """
    if transform is None:
        return "none"
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))
    return f"{type(transform).__name__}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class CacheKey:
    """What cached features depend on; a stored cache is used only when its key matches exactly.

    Args:
        model: an id that changes whenever the weights do, e.g. ``"torchvision:resnet50"`` or a
            checksum of the weights file.
        layer: the layer the features are taken from, e.g. ``"layer4"``.
        input_size: the shape of one input example, e.g. ``(3, 224, 224)`` (a list is accepted).
        transform: a fingerprint of the preprocessing, e.g. ``transform_fingerprint(transform)``.
        dataset: the identity of the rows, e.g. ``"train:" + dataset_fingerprint(dataset)``
            (:mod:`hookmix.headonly.dataset_identity`: file names, labels, sizes and mtimes, or tensor bytes), so that a
            cache is never served for changed files or another split; a name such as ``"cifar10:train"``
            only guards against another split (``""``: not recorded).
    """

    model: str
    layer: str
    input_size: tuple[int, ...]
    transform: str
    dataset: str = ""

    def __post_init__(self) -> None:
        for name in ("model", "layer", "transform", "dataset"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"CacheKey {name} must be a string, got {type(value).__name__} {value!r}.")
            if not value and name != "dataset":
                raise UsageError(f"CacheKey {name}='' is empty; give a non-empty string, e.g. 'layer4'.")
        size = self.input_size
        if not isinstance(size, (tuple, list)) or not size or not all(is_int(s, 1) for s in size):
            raise UsageError(
                f"CacheKey input_size={size!r} must be a non-empty tuple of positive ints, e.g. (3, 224, 224)."
            )
        object.__setattr__(self, "input_size", tuple(size))

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (``input_size`` as a list)."""
        return asdict(self) | {"input_size": list(self.input_size)}

    def fingerprint(self) -> str:
        """A stable 16-hex-digit hash of all fields (same key, same hash, in every process)."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def keyed_directory(root: str | Path, name: str, key: CacheKey, *, dtype: torch.dtype, views: int) -> str | Path:
    """``root/<name>-<12 hex digits>``: the directory of one cache among many under ``root``, named after its
    key, storage dtype and views (a ``Path``; a URL under a URL root such as ``s3://bucket/prefix``).

    Runs with other data or settings then extract next to each other instead of refusing, or replacing, a
    cache that another run may be reading; a changed dataset gets a new directory and the old one stays valid
    for the old data. ``name`` (e.g. ``"train"``) only makes the listing readable.
    """
    text = json.dumps([key.fingerprint(), dtype_name(dtype), views])
    return join(root, f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}")


@dataclass(eq=False, repr=False)
class FeatureCache:
    """Backbone features of a whole dataset, extracted once, to train a head on for many epochs.

    Attributes:
        features: ``(V, N, *F)`` features of ``N`` examples, ``V`` views each, in ``dtype``: a tensor, or
            for a memory-mapped cache (``load(..., mmap=True)``) a :class:`hookmix.headonly.streaming.ShardedFeatures`
            with the same ``shape`` and ``dtype`` that :func:`hookmix.fit` streams from disk.
        labels: ``(N, ...)`` labels as the dataset yields them (e.g. ``(N,)`` int64).
        key: the :class:`CacheKey` the features were extracted under.
        path: the cache directory (a URL for a cache in object storage), or ``None`` for an in-memory cache.
        batches_run: how many batches the backbone ran to build this object (0 when loaded; on a
            resumed extraction, only the batches of the shards that were missing).
        rows_reused: how many rows were read from a cache already on disk instead of extracted (all of them
            when loaded, or when :meth:`extract` found a complete cache for the key; see :attr:`reused`).
    """

    features: torch.Tensor | ShardedFeatures
    labels: torch.Tensor
    key: CacheKey
    path: Path | str | None = None
    batches_run: int = 0
    rows_reused: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.features, (torch.Tensor, ShardedFeatures)) or self.features.ndim < 2:
            raise UsageError(f"features must be a (V, N, *F) tensor, got {_describe(self.features)}.")
        if not isinstance(self.labels, torch.Tensor) or self.labels.ndim < 1:
            raise UsageError(f"labels must be an (N, ...) tensor, got {_describe(self.labels)}.")
        if self.labels.shape[0] != self.features.shape[1]:
            raise UsageError(
                f"labels has {self.labels.shape[0]} rows but features {tuple(self.features.shape)} "
                f"has N={self.features.shape[1]}; they must describe the same examples."
            )
        if not isinstance(self.key, CacheKey):
            raise TypeError(f"key must be a CacheKey, got {type(self.key).__name__} {self.key!r}.")

    def __len__(self) -> int:
        return self.features.shape[1]

    def __repr__(self) -> str:
        return (
            f"FeatureCache(N={len(self)}, views={self.views}, feature_shape={self.feature_shape}, "
            f"dtype={self.dtype}, layer={self.key.layer!r}, path={self.path})"
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.features.dtype

    @property
    def reused(self) -> bool:
        """Whether every row came from a cache on disk (same key, dtype and views): nothing was extracted."""
        return self.path is not None and self.rows_reused == len(self)

    @property
    def views(self) -> int:
        return self.features.shape[0]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """``F``: the shape of one example's features in one view."""
        return tuple(self.features.shape[2:])

    @property
    def bytes_per_example(self) -> int:
        """Feature bytes per example, all views together (labels excluded): ``V * prod(F) * itemsize``."""
        return bytes_per_example(self.views, self.feature_shape, self.dtype)

    @classmethod
    def extract(
        cls,
        backbone: nn.Module,
        dataset: Dataset,
        key: CacheKey,
        *,
        path: str | Path | None = None,
        dtype: torch.dtype = torch.float16,
        batch_size: int = 64,
        shard_size: int = 1024,
        views: int = 1,
        num_workers: int = 0,
        device: str | torch.device | None = None,
        progress: bool = True,
        mmap: bool | None = False,
        memory_budget: int | None = None,
    ) -> FeatureCache:
        """Run ``backbone`` once over ``dataset`` and keep its features (in memory, or on disk at ``path``).

        The dataset yields ``(x, y)`` with ``x`` ``(C, H, W)`` and is read in order (no shuffle). The
        backbone runs in eval mode under ``torch.no_grad()``; every submodule's training flag is
        restored afterwards, and BatchNorm statistics are left untouched. The returned features are
        ordinary tensors (not inference tensors), so a head can train on them directly.

        Args:
            backbone: frozen module mapping ``(B, C, H, W)`` to one tensor ``(B, *F)``.
            dataset: map-style dataset with ``len()``.
            key: what the features depend on; a stored cache must match it.
            path: cache directory. ``None`` keeps everything in memory. If the directory holds a
                complete cache for the same key, dtype, views and dataset length, it is loaded without
                running the backbone (:attr:`reused`); if it holds an interrupted one, its complete shards
                are verified and only the missing rows are computed; if it holds anything else,
                ``ValueError``. Writing holds the directory's lock (:func:`hookmix.headonly._cache_format.writer_lock`):
                a second process extracting into it waits, then loads what the first one wrote.
                :func:`keyed_directory` gives each key its own directory under one root.
            dtype: storage dtype: float16 (default; ~1e-3 relative error), bfloat16 or float32 (exact).
            batch_size: examples per backbone forward.
            shard_size: examples per shard file (``path`` only); a shard is the unit of resumption.
            views: passes over the data, stored as ``features[v]``. The views differ only through the
                dataset's own randomness (a random augmentation in its transform); with a
                deterministic dataset all views are equal. View ``v`` of row ``i`` is read with torch's,
                Python's and numpy's global generators seeded by ``(i, v)`` alone
                (:mod:`hookmix.headonly.view_seeds`), so the views are the same inputs on a rerun, a resume,
                with another batch size, shard size or number of workers, or split across ranks (the same
                cache bytes, but for the rounding a backbone may change with the batch size), and the caller's
                random state is left as it was. On disk, each shard runs its ``views`` passes before the
                next shard starts.
            num_workers: DataLoader worker processes.
            device: where the backbone runs: ``None`` — where its parameters are (it is not moved) —
                or ``"auto"`` / ``"cpu"`` / ``"cuda"`` / ``"mps"`` (:func:`~hookmix.core.devices.resolve_device`),
                to which the backbone is moved. On a GPU the batches come from pinned memory with
                non-blocking copies, and the backbone runs under autocast unless ``dtype`` is float32.
            progress: show a tqdm bar.
            mmap, memory_budget: how the stored cache is returned (``path`` only), as in :meth:`load`.
        """
        _check_backbone(backbone)
        run = _Pass(dtype, batch_size, shard_size, views, num_workers, device, progress, "extracting features", False)
        return cls._extract_targets(
            lambda names: backbone, dataset, {"features": (key, path)}, run, mmap, memory_budget
        )["features"]

    @classmethod
    def extract_many(
        cls,
        backbone_for: Callable[[tuple[str, ...]], nn.Module],
        dataset: Dataset,
        targets: Mapping[str, tuple[CacheKey, str | Path | None]],
        *,
        dtype: torch.dtype = torch.float16,
        batch_size: int = 64,
        shard_size: int = 1024,
        views: int = 1,
        num_workers: int = 0,
        device: str | torch.device | None = None,
        progress: bool = True,
        mmap: bool | None = False,
        memory_budget: int | None = None,
        desc: str = "extracting features",
    ) -> dict[str, FeatureCache]:
        """Several caches of one dataset from ONE backbone pass, e.g. the features of two layers of a model.

        Each target ``name: (key, path)`` is one cache, exactly as :meth:`extract` would make it with that key
        and path (the same shards, manifest, lock, resumption and reuse; ``path=None``: in memory). Targets whose
        cache is already complete at ``path`` are loaded; when all are, no backbone is built or run. Otherwise
        ``backbone_for(names)`` is called once with the names still to extract and returns the module that maps
        ``(B, C, H, W)`` to a mapping ``{name: (B, *F_name)}`` with at least those names (with one name, a
        single tensor is accepted); it runs once over the rows none of them has stored yet, and each target
        keeps the rows it lacks. The directories' writer locks are all held for the pass, taken in path order.

        Features are bitwise those of :meth:`extract` with a backbone returning one of the outputs alone.
        The other arguments are those of :meth:`extract` and apply to every target; the progress bar reads
        ``"{desc}: {names}"`` (the names extracted). Returns the caches by name, in the order of ``targets``; each
        one's :attr:`batches_run` is the pass's when it took rows from it, else 0.
        """
        run = _Pass(dtype, batch_size, shard_size, views, num_workers, device, progress, desc, True)
        return cls._extract_targets(backbone_for, dataset, targets, run, mmap, memory_budget)

    @classmethod
    def _extract_targets(
        cls,
        backbone_for: Callable[[tuple[str, ...]], nn.Module],
        dataset: Dataset,
        targets: Mapping[str, tuple[CacheKey, str | Path | None]],
        run: _Pass,
        mmap: bool | None,
        memory_budget: int | None,
    ) -> dict[str, FeatureCache]:
        """:meth:`extract_many` (and :meth:`extract`, one target) with the pass's settings in ``run``."""
        _check_mmap(mmap, memory_budget)
        wanted = _targets(targets)
        if mmap and any(target.directory is None for target in wanted):
            raise UsageError("mmap=True needs path=DIR: only a cache stored on disk can be memory-mapped.")
        _check_pass_args(dataset, run.dtype, run.batch_size, run.shard_size, run.views, run.num_workers)
        count = len(dataset)  # type: ignore[arg-type]
        todo = [target for target in wanted if not _stored(target, count, run)]
        batches, kept = _extract_missing(backbone_for, dataset, todo, run) if todo else (0, {})
        caches = {}
        for target in wanted:
            ran = batches if target.done < count else 0
            if target.directory is None:
                features, labels = kept[target.name]
                caches[target.name] = cls(features, labels, target.key, batches_run=ran)
                continue
            stored = dict(dtype=run.dtype, views=run.views, mmap=mmap, memory_budget=memory_budget)
            cache = cls.load(target.directory, target.key, **stored)
            cache.batches_run, cache.rows_reused = ran, target.done
            caches[target.name] = cache
        return caches

    @classmethod
    def load(
        cls,
        path: str | Path,
        key: CacheKey,
        *,
        dtype: torch.dtype | None = None,
        views: int | None = None,
        mmap: bool | None = False,
        memory_budget: int | None = None,
    ) -> FeatureCache:
        """Load a complete cache directory after verifying it, or memory-map it; never unpickles.

        Refuses with ``ValueError`` a cache built for another key (naming the field, the stored and
        the requested value), another ``dtype`` or number of ``views`` (checked when given), an
        incomplete extraction (saying whether another process is extracting it now or it was
        interrupted), a missing, truncated or altered shard, or an invalid manifest.

        Args:
            mmap: ``False`` reads every shard (checking its sha256) into one ``(V, N, *F)`` tensor. ``True``
                reads only the labels and leaves the features on disk as a
                :class:`hookmix.headonly.streaming.ShardedFeatures`: each shard's size and header are checked now,
                its sha256 when :func:`hookmix.fit` reads it, so a corrupted shard is refused
                mid-epoch, before any of its rows is trained on. ``None``: ``True`` when the shard files
                exceed ``memory_budget``.
            memory_budget: bytes (``mmap=None`` only); ``None``: half of the memory available now
                (:func:`hookmix.headonly.streaming.default_memory_budget`).
        """
        _check_mmap(mmap, memory_budget)
        directory = open_store(path)
        if not directory.exists(MANIFEST_NAME) and directory.active():
            raise UsageError(f"{_BEING_WRITTEN.format(directory=directory, done='no shard is complete yet')}.")
        manifest = Manifest.read(directory, CacheKey)
        check_request(manifest, directory, key, dtype=dtype, views=views, count=None)
        if not manifest.complete:
            raise UsageError(_incomplete(directory, manifest))
        if mmap is None:
            mmap = manifest.stored_bytes > (default_memory_budget() if memory_budget is None else memory_budget)
        if mmap:
            sharded = ShardedFeatures(directory, manifest)
            return cls(sharded, sharded.labels(), manifest.key, path=directory.path, rows_reused=manifest.count)
        shape = (manifest.views, manifest.count, *manifest.feature_shape)
        features = torch.empty(shape, dtype=manifest.dtype)
        labels = torch.empty((manifest.count, *manifest.label_shape), dtype=manifest.label_dtype)
        for shard, shard_features, shard_labels in read_shards(directory, manifest):
            features[:, shard.start : shard.stop], labels[shard.start : shard.stop] = shard_features, shard_labels
        return cls(features, labels, manifest.key, path=directory.path, rows_reused=manifest.count)

    def save(self, path: str | Path, *, shard_size: int = 1024) -> FeatureCache:
        """Write this cache to the directory ``path`` in the on-disk format and return it with ``path`` set.

        The shards and manifest are those :meth:`extract` writes, so :meth:`load` and ``hookmix finetune
        --cache`` read the result; it serves to store caches built in parts (e.g. one per rank, see
        :func:`hookmix.headonly.distributed.extract_sharded`). Refuses a directory that already holds a cache.
        """
        if not is_int(shard_size, 1):
            raise UsageError(f"shard_size={shard_size!r} must be a positive int.")
        if isinstance(self.features, ShardedFeatures):
            raise UsageError(f"this cache is already stored in {self.path}; copy that directory instead of save().")
        if self.dtype not in FEATURE_DTYPES:
            names = ", ".join(f"torch.{dtype_name(d)}" for d in FEATURE_DTYPES)
            raise UsageError(f"features of dtype {self.dtype} cannot be stored; convert them to one of {names}.")
        directory = open_store(path)
        directory.prepare()
        with directory.lock():
            if directory.exists(MANIFEST_NAME):
                raise UsageError(f"{directory} already holds a feature cache; save to another path.")
            writer = ShardWriter(directory, self.key, self.dtype, self.views, len(self), None)
            for start in range(0, len(self), shard_size):
                stop = min(start + shard_size, len(self))
                writer(start, stop, self.features[:, start:stop].contiguous(), self.labels[start:stop].contiguous())
        return FeatureCache(self.features, self.labels, self.key, path=directory.path)


def _resume(directory: Store, key: CacheKey, **request: Any) -> tuple[Manifest | None, int]:
    """The manifest an interrupted extraction left in ``directory`` (``None``: none) and the row to go on from;
    its shards are verified first, unless it holds all the rows (``request``: the dtype, views and count
    :func:`check_request` compares)."""
    if not directory.exists(MANIFEST_NAME):
        return None, 0
    previous = Manifest.read(directory, CacheKey)
    check_request(previous, directory, key, **request)
    for shard in previous.shards if not previous.complete else ():
        read_shard(directory, shard, previous)
    return previous, previous.rows_done


@dataclass
class _Target:
    """One cache a pass fills: its name, key and store (a local directory or a prefix in object storage;
    ``None``: in memory), and the rows found stored (set when its store is checked)."""

    name: str
    key: CacheKey
    directory: Store | None
    previous: Manifest | None = None
    done: int = 0


@dataclass(frozen=True)
class _Pass:
    """How one pass runs: the arguments of :meth:`FeatureCache.extract_many` shared by its targets, and whether
    its progress bar names the outputs it extracts."""

    dtype: torch.dtype
    batch_size: int
    shard_size: int
    views: int
    num_workers: int
    device: str | torch.device | None
    progress: bool
    desc: str
    name_outputs: bool


def _targets(targets: object) -> list[_Target]:
    """The targets of :meth:`FeatureCache.extract_many`, checked: names, keys and distinct directories."""
    if not isinstance(targets, Mapping) or not targets:
        raise UsageError(f"targets must be a non-empty mapping name -> (key, path), got {targets!r}.")
    found = []
    for name, target in targets.items():
        if not isinstance(name, str) or not (isinstance(target, tuple) and len(target) == 2):
            raise TypeError(f"targets must map a name (str) to (CacheKey, path or None), got {name!r}: {target!r}.")
        key, path = target
        _check_key(key)
        found.append(_Target(name, key, None if path is None else open_store(path)))
    directories = [_identity(t.directory) for t in found if t.directory is not None]
    if len(set(directories)) != len(directories):
        raise UsageError(f"two targets share a cache directory ({sorted(directories)}); give each its own.")
    return found


def _identity(store: Store) -> str:
    """Where ``store`` lives, one spelling per place: a resolved local path, or the URL."""
    return str(store.path.resolve()) if isinstance(store.path, Path) else store.path


def _stored(target: _Target, count: int, run: _Pass) -> bool:
    """Whether ``target``'s directory holds its complete cache (checked without the lock: a complete cache
    never changes, and a read-only copy works)."""
    published = None if target.directory is None else _published(target.directory)
    if published is None:
        return False
    check_request(published, target.directory, target.key, dtype=run.dtype, views=run.views, count=count)
    target.done = count
    return True


def _extract_missing(
    backbone_for: Callable[[tuple[str, ...]], nn.Module], dataset: Dataset, todo: list[_Target], run: _Pass
) -> tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Extract the rows ``todo``'s caches lack in one pass, under all their directories' writer locks (taken
    in path order, so that two such passes over shared directories cannot deadlock); the batches run and the in-memory
    targets' ``(features, labels)``. A target completed by another writer meanwhile takes nothing."""
    count = len(dataset)  # type: ignore[arg-type]
    on_disk = sorted((t for t in todo if t.directory is not None), key=lambda t: str(t.directory))
    with contextlib.ExitStack() as locks:
        for target in on_disk:
            target.directory.prepare()
            locks.enter_context(target.directory.lock(_say_on_stderr if run.progress else None))
            request = dict(dtype=run.dtype, views=run.views, count=count)
            target.previous, target.done = _resume(target.directory, target.key, **request)
        active = [t for t in todo if t.done < count]
        if not active:
            return 0, {}
        backbone = backbone_for(tuple(t.name for t in active))
        _check_backbone(backbone)
        sinks, kept = _sinks(active, count, run)
        ranges = pass_ranges([(t.done, run.shard_size if t.directory else count) for t in active], count)
        desc = f"{run.desc}: {', '.join(t.name for t in active)}" if run.name_outputs else run.desc
        options = dict(views=run.views, dtype=run.dtype, batch_size=run.batch_size, num_workers=run.num_workers)
        device = place_module(backbone, run.device)
        batches = run_backbone(
            backbone, dataset, ranges, sinks, device=device, progress=run.progress, desc=desc, **options
        )
    return batches, {name: keep.result() for name, keep in kept.items()}


def _sinks(active: list[_Target], count: int, run: _Pass) -> tuple[dict[str, Sink], dict[str, _Keep]]:
    """Each target's sink: its shards written from its own first missing row, or kept in memory."""
    sinks: dict[str, Sink] = {}
    kept: dict[str, _Keep] = {}
    for t in active:
        if t.directory is None:
            sinks[t.name] = kept[t.name] = _Keep()
            continue
        writer = ShardWriter(t.directory, t.key, run.dtype, run.views, count, t.previous)
        sinks[t.name] = Regroup(writer, t.done, count, run.shard_size)
    return sinks, kept


class _Keep:
    """A sink that keeps the ranges in memory; :meth:`result` joins them into ``(V, N, *F)`` and ``(N, ...)``."""

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, start: int, stop: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.parts.append((features, labels))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.parts) == 1:
            return self.parts[0]
        return torch.cat([f for f, _ in self.parts], dim=1), torch.cat([y for _, y in self.parts])


def _published(directory: Store) -> Manifest | None:
    """The manifest of the complete cache in ``directory`` (of any key), or ``None``: no cache, an incomplete
    one or an invalid manifest, which the writer's path (under the lock) reads again and reports."""
    try:
        manifest = Manifest.read(directory, CacheKey)
    except UsageError:
        return None
    return manifest if manifest.complete else None


def _say_on_stderr(line: str) -> None:
    tqdm.write(f"hookmix: {line}", file=sys.stderr)


_BEING_WRITTEN = (
    "the feature cache in {directory} is being extracted by another process now ({done}); "
    "FeatureCache.extract with the same key and path waits for it and then loads the cache"
)


def _incomplete(directory: Store, manifest: Manifest) -> str:
    """Why an incomplete cache cannot be loaded: another process is extracting it now, or it was interrupted."""
    done = f"{manifest.rows_done} of {manifest.count} examples"
    if directory.active():
        return f"{_BEING_WRITTEN.format(directory=directory, done=done + ' so far')}."
    return (
        f"the feature cache in {directory} is incomplete ({done}; its extraction was interrupted); "
        "call FeatureCache.extract with the same key and path to resume it."
    )


def _check_mmap(mmap: object, memory_budget: object) -> None:
    if mmap is not None and not isinstance(mmap, bool):
        raise TypeError(f"mmap must be True, False or None (decide by memory_budget), got {mmap!r}.")
    if memory_budget is not None:
        check_int("memory_budget", memory_budget, 1, " (bytes), or None for half the available memory")


def _describe(value: object) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _check_backbone(backbone: object) -> None:
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}.")


def _check_key(key: object) -> None:
    if not isinstance(key, CacheKey):
        raise TypeError(f"key must be a CacheKey, got {type(key).__name__} {key!r}.")


def check_extract_args(
    backbone: object,
    dataset: object,
    key: object,
    dtype: object,
    batch_size: object,
    shard_size: object,
    views: object,
    num_workers: object,
) -> None:
    """The arguments of one cache's extraction by a backbone with one output, as the ranks of a sharded extraction
    (:func:`hookmix.headonly.distributed.extract_sharded`) take them: ``UsageError`` / ``TypeError`` naming the
    argument."""
    _check_backbone(backbone)
    _check_key(key)
    _check_pass_args(dataset, dtype, batch_size, shard_size, views, num_workers)


def _check_pass_args(
    dataset: object,
    dtype: object,
    batch_size: object,
    shard_size: object,
    views: object,
    num_workers: object,
) -> None:
    if not isinstance(dataset, Sized):
        raise TypeError(f"dataset must be a map-style Dataset with len(), got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise UsageError("dataset is empty (len(dataset) == 0); there is nothing to extract.")
    if dtype not in FEATURE_DTYPES:
        names = ", ".join(f"torch.{dtype_name(d)}" for d in FEATURE_DTYPES)
        raise UsageError(f"dtype={dtype!r} is not a feature storage dtype; use one of {names}.")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("views", views)):
        if not is_int(value, 1):
            raise UsageError(f"{name}={value!r} must be a positive int.")
    check_int("num_workers", num_workers, 0, " (0 loads in the main process)")
