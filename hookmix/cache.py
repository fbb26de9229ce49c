"""Feature cache for head-only fine-tuning: run a frozen backbone once, train a head for many epochs.

With a frozen backbone, the features of layer L do not change between epochs, so
:meth:`FeatureCache.extract` runs the backbone ONCE over a dataset (eval mode, ``torch.no_grad()``,
a tqdm bar) and keeps its outputs; training a head for E epochs then costs about one backbone pass.

Shapes: the backbone maps a batch ``(B, C, H, W)`` to features ``(B, *F)`` with one fixed ``F`` per
row, e.g. ``(B, 2048, 7, 7)`` or tokens ``(B, N, D)``. The cache holds ``features`` ``(V, N, *F)``
(``V`` views per example, 1 by default) and ``labels`` ``(N, ...)`` exactly as the dataset yields
them (``(N,)`` int64 class indices, ``(N, n_classes)`` float multi-label targets, ...).

Precision: features are stored as float16 by default, which halves memory and disk against float32
at a relative rounding error of at most 2**-11 (about 5e-4; budget ~1e-3 when comparing). Features
beyond float16's range (|x| > 65504) are refused rather than stored as inf; pass
``dtype=torch.float32`` (bitwise equal to the backbone's output) or ``torch.bfloat16`` then.

On disk (``path=...``) a cache is a directory of safetensors shards, ``shard-00000.safetensors``, ...,
each holding ``features`` ``(V, n, *F)`` and ``labels`` ``(n, ...)`` for a contiguous range of ``n``
examples, plus ``manifest.json`` (format version, the :class:`CacheKey` fields, dtype, shapes, count,
views, bytes per example, and each shard's row range, byte size and sha256). Every file is written
atomically (temp file in the same directory, then ``os.replace``) and the manifest is rewritten after
each completed shard, so an interrupted extraction resumes from its last complete shard; a kill may
leave a ``.*.tmp`` file behind, which is safe to delete. Loading reads only JSON and safetensors
(never pickle), checks every shard's size and checksum, and refuses any mismatch with a
``ValueError`` that says what differs and how to fix it. A loaded cache is concatenated into one
in-memory tensor, so it suits datasets whose features fit in RAM; one directory serves one
extraction at a time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Sized
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hookmix._checks import check_int, is_int, modes_restored
from hookmix._io import atomic_write

__all__ = ["CacheKey", "FeatureCache", "transform_fingerprint", "FEATURE_DTYPES", "MANIFEST_NAME"]

FORMAT = "hookmix-feature-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# One completed shard hands (start, stop, features (V, n, *F), labels (n, ...)) to a sink.
_Sink = Callable[[int, int, torch.Tensor, torch.Tensor], None]


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
        dataset: optional id of the data and split, e.g. ``"cifar10:train"``, so that a cache of one
            split is never served for another of the same length (``""``: not recorded).
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
                raise ValueError(f"CacheKey {name}='' is empty; give a non-empty string, e.g. 'layer4'.")
        size = self.input_size
        if not isinstance(size, (tuple, list)) or not size or not all(_is_positive_int(s) for s in size):
            raise ValueError(
                f"CacheKey input_size={size!r} must be a non-empty tuple of positive ints, "
                "e.g. (3, 224, 224)."
            )
        object.__setattr__(self, "input_size", tuple(size))

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (``input_size`` as a list)."""
        return asdict(self) | {"input_size": list(self.input_size)}

    def fingerprint(self) -> str:
        """A stable 16-hex-digit hash of all fields (same key, same hash, in every process)."""
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _is_positive_int(value: object) -> bool:
    return is_int(value, 1)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bytes_per_example(views: int, feature_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return views * math.prod(feature_shape) * dtype.itemsize


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _hookmix_version() -> str:
    try:
        return importlib.metadata.version("hookmix")
    except importlib.metadata.PackageNotFoundError:
        return getattr(sys.modules.get("hookmix"), "__version__", "unknown")


def _rebuild_hint(directory: Path) -> str:
    return f"delete {directory} (or use another --cache directory) and extract again"


@dataclass(frozen=True)
class _Shard:
    file: str
    start: int
    stop: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class _Manifest:
    """The parsed ``manifest.json``; ``shards`` cover rows ``[0, rows_done)`` in order."""

    key: CacheKey
    dtype: torch.dtype
    feature_shape: tuple[int, ...]
    label_dtype: torch.dtype
    label_shape: tuple[int, ...]
    count: int
    views: int
    shards: tuple[_Shard, ...]
    created: str
    hookmix_version: str

    @property
    def rows_done(self) -> int:
        return self.shards[-1].stop if self.shards else 0

    @property
    def complete(self) -> bool:
        return self.rows_done == self.count

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "hookmix_version": self.hookmix_version,
                "created": self.created,
                "key": self.key.as_dict(),
                "fingerprint": self.key.fingerprint(),
                "dtype": _dtype_name(self.dtype),
                "feature_shape": list(self.feature_shape),
                "label_dtype": _dtype_name(self.label_dtype),
                "label_shape": list(self.label_shape),
                "count": self.count,
                "views": self.views,
                "bytes_per_example": _bytes_per_example(self.views, self.feature_shape, self.dtype),
                "shards": [vars(shard) for shard in self.shards],
            },
            indent=2,
        ).encode()

    @classmethod
    def read(cls, directory: Path) -> _Manifest:
        """Parse and validate ``directory/manifest.json``; ``ValueError`` when missing or invalid."""
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise ValueError(
                f"no feature cache in {directory}: {MANIFEST_NAME} is missing; "
                "run FeatureCache.extract(..., path=...) to create it."
            )
        try:
            data = json.loads(path.read_bytes())
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            if _get(data, "format", str) != FORMAT or _get(data, "format_version", int) != FORMAT_VERSION:
                raise ValueError(
                    f"format {data['format']!r} version {data['format_version']!r} is not "
                    f"{FORMAT!r} version {FORMAT_VERSION}"
                )
            key_data = _get(data, "key", dict)
            manifest = cls(
                key=CacheKey(**{f.name: _get(key_data, f.name, object) for f in fields(CacheKey)}),
                dtype=_parse_dtype(_get(data, "dtype", str)),
                feature_shape=_shape(_get(data, "feature_shape", list)),
                label_dtype=_parse_dtype(_get(data, "label_dtype", str)),
                label_shape=_shape(_get(data, "label_shape", list)),
                count=_get(data, "count", int),
                views=_get(data, "views", int),
                shards=tuple(_parse_shard(s) for s in _get(data, "shards", list)),
                created=_get(data, "created", str),
                hookmix_version=_get(data, "hookmix_version", str),
            )
            manifest._check_layout()
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(
                f"{path} is not a valid feature cache manifest ({exc}); {_rebuild_hint(directory)}."
            ) from exc
        return manifest

    def _check_layout(self) -> None:
        if self.dtype not in FEATURE_DTYPES or self.count < 1 or self.views < 1:
            raise ValueError(f"dtype={self.dtype}, count={self.count}, views={self.views} out of range")
        previous_stop = 0
        for index, shard in enumerate(self.shards):
            if shard.file != _shard_name(index) or shard.start != previous_stop or not (
                shard.start < shard.stop <= self.count
            ):
                raise ValueError(f"shard entry {index} {vars(shard)} breaks the contiguous shard layout")
            previous_stop = shard.stop


def _get(data: dict[str, Any], name: str, kind: type) -> Any:
    if name not in data:
        raise ValueError(f"missing field {name!r}")
    value = data[name]
    if not (is_int(value) if kind is int else isinstance(value, kind)):
        raise TypeError(f"field {name!r} should be {kind.__name__}, got {value!r}")
    return value


def _shape(values: list[Any]) -> tuple[int, ...]:
    if not all(is_int(v, 0) for v in values):
        raise ValueError(f"shape {values!r} must hold non-negative ints")
    return tuple(values)


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype


def _parse_shard(data: object) -> _Shard:
    if not isinstance(data, dict):
        raise TypeError(f"shard entry should be an object, got {data!r}")
    shard = _Shard(
        file=_get(data, "file", str),
        start=_get(data, "start", int),
        stop=_get(data, "stop", int),
        bytes=_get(data, "bytes", int),
        sha256=_get(data, "sha256", str),
    )
    if not re.fullmatch(r"[0-9a-f]{64}", shard.sha256):
        raise ValueError(f"shard {shard.file!r} has an invalid sha256 {shard.sha256!r}")
    return shard


def _check_request(
    manifest: _Manifest,
    directory: Path,
    key: CacheKey,
    *,
    dtype: torch.dtype | None,
    views: int | None,
    count: int | None,
) -> None:
    """Refuse a stored cache whose key, dtype, views or count differ from the requested ones."""
    if not isinstance(key, CacheKey):
        raise TypeError(f"key must be a CacheKey, got {type(key).__name__} {key!r}.")
    stored: dict[str, Any] = {f.name: getattr(manifest.key, f.name) for f in fields(CacheKey)}
    requested: dict[str, Any] = {f.name: getattr(key, f.name) for f in fields(CacheKey)}
    stored.update(dtype=_dtype_name(manifest.dtype), views=manifest.views, count=manifest.count)
    requested.update(dtype=None if dtype is None else _dtype_name(dtype), views=views, count=count)
    for name, want in requested.items():
        if want is not None and stored[name] != want:
            raise ValueError(
                f"the feature cache in {directory} was built for {name}={stored[name]!r}, but "
                f"{name}={want!r} was requested; use another --cache directory, or "
                f"delete {directory} to extract again."
            )


def _read_shard(directory: Path, shard: _Shard, manifest: _Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify one shard (size, sha256, tensor names, dtypes, shapes) and return (features, labels)."""
    path = directory / shard.file
    fix = _rebuild_hint(directory)
    if not path.is_file():
        raise ValueError(f"shard {path} listed in {MANIFEST_NAME} is missing; {fix}.")
    size = path.stat().st_size
    if size != shard.bytes:
        raise ValueError(
            f"shard {path} is {size} bytes but {MANIFEST_NAME} says {shard.bytes} (truncated?); {fix}."
        )
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        raise ValueError(
            f"shard {path} fails its checksum (sha256 {digest[:12]}..., {MANIFEST_NAME} says "
            f"{shard.sha256[:12]}...): the file is corrupted or was altered; {fix}."
        )
    try:
        tensors = load_safetensors(data)
    except SafetensorError as exc:
        raise ValueError(f"shard {path} is not a valid safetensors file ({exc}); {fix}.") from exc
    rows = shard.stop - shard.start
    expected = {
        "features": (manifest.dtype, (manifest.views, rows, *manifest.feature_shape)),
        "labels": (manifest.label_dtype, (rows, *manifest.label_shape)),
    }
    found = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    if found != expected:
        raise ValueError(f"shard {path} holds {found}, but {MANIFEST_NAME} implies {expected}; {fix}.")
    return tensors["features"], tensors["labels"]


def _backbone_device(backbone: nn.Module) -> torch.device:
    tensor = next(itertools.chain(backbone.parameters(), backbone.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _run_backbone(
    backbone: nn.Module,
    dataset: Dataset,
    ranges: list[tuple[int, int]],
    sink: _Sink,
    *,
    views: int,
    dtype: torch.dtype,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
) -> int:
    """Run ``backbone`` over ``views`` passes of each row range in turn, hand each range to ``sink``.

    Batches never straddle two ranges, so one DataLoader (its workers started once) serves every
    range. Returns the number of batches the backbone ran.
    """
    plan = [
        (range_index, view, list(range(b, min(b + batch_size, stop))))
        for range_index, (start, stop) in enumerate(ranges)
        for view in range(views)
        for b in range(start, stop, batch_size)
    ]
    loader = DataLoader(
        dataset,
        batch_sampler=[indices for _, _, indices in plan],
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    total = views * sum(stop - start for start, stop in ranges)
    features: list[list[torch.Tensor]] = [[] for _ in range(views)]
    labels: list[list[torch.Tensor]] = [[] for _ in range(views)]
    batches = 0
    with modes_restored(backbone, False), torch.no_grad(), tqdm(
        total=total, desc="extracting features", unit="ex", disable=not progress
    ) as bar:
        for (range_index, view, indices), batch in zip(plan, loader):
            x, y = _split_batch(batch)
            out = backbone(x.to(device, non_blocking=True))
            batches += 1
            features[view].append(_store(out, len(indices), dtype, indices[0]))
            labels[view].append(y)
            bar.update(len(indices))
            start, stop = ranges[range_index]
            if view == views - 1 and indices[-1] == stop - 1:
                sink(start, stop, *_assemble(features, labels, start))
                features, labels = [[] for _ in range(views)], [[] for _ in range(views)]
    return batches


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
        raise TypeError(f"dataset must yield (x, y) pairs; a collated batch was {type(batch).__name__}.")
    x, y = batch
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(
            f"dataset must yield (x, y) with tensor-like x and y; got a batch of x: {type(x).__name__}, "
            f"y: {type(y).__name__} (ints and floats are fine, strings are not)."
        )
    return x, y


def _store(out: Any, rows: int, dtype: torch.dtype, first_index: int) -> torch.Tensor:
    """The backbone's output ``(B, *F)`` as a CPU tensor of ``dtype``, checked for shape and range."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"backbone must return one tensor (B, *F), got {type(out).__name__}; wrap it in a module "
            "that returns the feature tensor you want cached."
        )
    if out.ndim < 1 or out.shape[0] != rows:
        raise ValueError(f"backbone returned shape {tuple(out.shape)} for a batch of {rows} examples.")
    stored = out.detach().to(dtype=dtype).cpu()
    if not torch.isfinite(stored).all() and torch.isfinite(out).all():
        raise ValueError(
            f"features of examples {first_index}..{first_index + rows - 1} exceed the range of {dtype} "
            f"(max |x| = {out.abs().max().item():.4g}); pass dtype=torch.float32 or torch.bfloat16."
        )
    return stored


def _assemble(
    features: list[list[torch.Tensor]], labels: list[list[torch.Tensor]], start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view batch lists -> features ``(V, n, *F)`` and labels ``(n, ...)``; views must agree on labels."""
    try:
        stacked = torch.stack([torch.cat(view) for view in features])
    except RuntimeError as exc:
        raise ValueError(
            f"backbone feature shapes differ between batches near example {start} ({exc}); "
            "every row must have one fixed feature shape."
        ) from exc
    view_labels = [torch.cat(view) for view in labels]
    for view, other in enumerate(view_labels[1:], start=1):
        if not torch.equal(other, view_labels[0]):
            raise ValueError(
                f"view {view} of examples from {start} got different labels than view 0; views are "
                "passes over the same examples and may differ only in their (augmented) inputs."
            )
    return stacked.contiguous(), view_labels[0].contiguous()


class _ShardWriter:
    """A sink that writes each range as the next shard, then rewrites the manifest (both atomically)."""

    def __init__(
        self,
        directory: Path,
        key: CacheKey,
        dtype: torch.dtype,
        views: int,
        count: int,
        previous: _Manifest | None,
    ) -> None:
        self.directory = directory
        self.key = key
        self.dtype = dtype
        self.views = views
        self.count = count
        self.manifest = previous
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.created = previous.created if previous else now

    def __call__(self, start: int, stop: int, features: torch.Tensor, labels: torch.Tensor) -> None:
        shards = self.manifest.shards if self.manifest else ()
        manifest = _Manifest(
            key=self.key,
            dtype=self.dtype,
            feature_shape=tuple(features.shape[2:]),
            label_dtype=labels.dtype,
            label_shape=tuple(labels.shape[1:]),
            count=self.count,
            views=self.views,
            shards=shards,
            created=self.created,
            hookmix_version=_hookmix_version(),
        )
        if self.manifest is not None:
            _check_consistent(self.manifest, manifest, self.directory)
        data = save_safetensors({"features": features, "labels": labels})
        name = _shard_name(len(shards))
        atomic_write(self.directory / name, data)
        shard = _Shard(name, start, stop, len(data), hashlib.sha256(data).hexdigest())
        self.manifest = replace(manifest, shards=(*shards, shard))
        atomic_write(self.directory / MANIFEST_NAME, self.manifest.to_json())


def _check_consistent(before: _Manifest, now: _Manifest, directory: Path) -> None:
    """Refuse new rows whose feature / label layout differs from the shards already stored."""
    for name in ("feature_shape", "label_dtype", "label_shape"):
        if getattr(before, name) != getattr(now, name):
            raise ValueError(
                f"rows from {before.rows_done} have {name}={getattr(now, name)}, but the shards already in "
                f"{directory} have {name}={getattr(before, name)}; {_rebuild_hint(directory)}."
            )


@dataclass(eq=False, repr=False)
class FeatureCache:
    """Backbone features of a whole dataset, extracted once, to train a head on for many epochs.

    Attributes:
        features: ``(V, N, *F)`` features of ``N`` examples, ``V`` views each, in ``dtype``.
        labels: ``(N, ...)`` labels as the dataset yields them (e.g. ``(N,)`` int64).
        key: the :class:`CacheKey` the features were extracted under.
        path: the cache directory, or ``None`` for an in-memory cache.
        batches_run: how many batches the backbone ran to build this object (0 when loaded; on a
            resumed extraction, only the batches of the shards that were missing).
    """

    features: torch.Tensor
    labels: torch.Tensor
    key: CacheKey
    path: Path | None = None
    batches_run: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.features, torch.Tensor) or self.features.ndim < 2:
            raise ValueError(f"features must be a (V, N, *F) tensor, got {_describe(self.features)}.")
        if not isinstance(self.labels, torch.Tensor) or self.labels.ndim < 1:
            raise ValueError(f"labels must be an (N, ...) tensor, got {_describe(self.labels)}.")
        if self.labels.shape[0] != self.features.shape[1]:
            raise ValueError(
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
    def views(self) -> int:
        return self.features.shape[0]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """``F``: the shape of one example's features in one view."""
        return tuple(self.features.shape[2:])

    @property
    def bytes_per_example(self) -> int:
        """Feature bytes per example, all views together (labels excluded): ``V * prod(F) * itemsize``."""
        return _bytes_per_example(self.views, self.feature_shape, self.dtype)

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
                running the backbone; if it holds an interrupted one, its complete shards are verified
                and only the missing rows are computed; if it holds anything else, ``ValueError``.
            dtype: storage dtype: float16 (default; ~1e-3 relative error), bfloat16 or float32 (exact).
            batch_size: examples per backbone forward.
            shard_size: examples per shard file (``path`` only); a shard is the unit of resumption.
            views: passes over the data, stored as ``features[v]``. The views differ only through the
                dataset's own randomness (a random augmentation in its transform); with a
                deterministic dataset all views are equal. On disk, each shard runs its ``views``
                passes before the next shard starts.
            num_workers: DataLoader worker processes.
            device: where the inputs go; ``None`` means the device of the backbone's parameters (the
                backbone itself is never moved).
            progress: show a tqdm bar.
        """
        _check_extract_args(backbone, dataset, key, dtype, batch_size, shard_size, views, num_workers)
        count = len(dataset)  # type: ignore[arg-type]
        target = _backbone_device(backbone) if device is None else torch.device(device)
        run = dict(views=views, dtype=dtype, batch_size=batch_size, num_workers=num_workers, device=target)
        if path is None:
            parts: list[tuple[torch.Tensor, torch.Tensor]] = []

            def keep(start: int, stop: int, features: torch.Tensor, labels: torch.Tensor) -> None:
                parts.append((features, labels))

            batches = _run_backbone(backbone, dataset, [(0, count)], keep, progress=progress, **run)
            [(features, labels)] = parts
            return cls(features, labels, key, batches_run=batches)
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        previous = _Manifest.read(directory) if (directory / MANIFEST_NAME).exists() else None
        if previous is not None:
            _check_request(previous, directory, key, dtype=dtype, views=views, count=count)
            if previous.complete:
                return cls.load(directory, key, dtype=dtype, views=views)
            for shard in previous.shards:
                _read_shard(directory, shard, previous)
        done = previous.rows_done if previous else 0
        ranges = [(start, min(start + shard_size, count)) for start in range(done, count, shard_size)]
        writer = _ShardWriter(directory, key, dtype, views, count, previous)
        batches = _run_backbone(backbone, dataset, ranges, writer, progress=progress, **run)
        cache = cls.load(directory, key, dtype=dtype, views=views)
        cache.batches_run = batches
        return cache

    @classmethod
    def load(
        cls, path: str | Path, key: CacheKey, *, dtype: torch.dtype | None = None, views: int | None = None
    ) -> FeatureCache:
        """Load a complete cache directory after verifying it; never unpickles.

        Refuses with ``ValueError`` a cache built for another key (naming the field, the stored and
        the requested value), another ``dtype`` or number of ``views`` (checked when given), an
        incomplete extraction, a missing, truncated or altered shard, or an invalid manifest.
        """
        directory = Path(path)
        manifest = _Manifest.read(directory)
        _check_request(manifest, directory, key, dtype=dtype, views=views, count=None)
        if not manifest.complete:
            raise ValueError(
                f"the feature cache in {directory} is incomplete ({manifest.rows_done} of {manifest.count} "
                "examples; its extraction was interrupted); call FeatureCache.extract with the same key "
                "and path to resume it."
            )
        shape = (manifest.views, manifest.count, *manifest.feature_shape)
        features = torch.empty(shape, dtype=manifest.dtype)
        labels = torch.empty((manifest.count, *manifest.label_shape), dtype=manifest.label_dtype)
        for shard in manifest.shards:
            features[:, shard.start : shard.stop], labels[shard.start : shard.stop] = _read_shard(
                directory, shard, manifest
            )
        return cls(features, labels, manifest.key, path=directory)

    def save(self, path: str | Path, *, shard_size: int = 1024) -> FeatureCache:
        """Write this cache to the directory ``path`` in the on-disk format and return it with ``path`` set.

        The shards and manifest are those :meth:`extract` writes, so :meth:`load` and ``hookmix finetune
        --cache`` read the result; it serves to store caches built in parts (e.g. one per rank, see
        :func:`hookmix.distributed.extract_sharded`). Refuses a directory that already holds a cache.
        """
        if not _is_positive_int(shard_size):
            raise ValueError(f"shard_size={shard_size!r} must be a positive int.")
        if self.dtype not in FEATURE_DTYPES:
            names = ", ".join(f"torch.{_dtype_name(d)}" for d in FEATURE_DTYPES)
            raise ValueError(f"features of dtype {self.dtype} cannot be stored; convert them to one of {names}.")
        directory = Path(path)
        if (directory / MANIFEST_NAME).exists():
            raise ValueError(f"{directory} already holds a feature cache; delete it or save to another path.")
        directory.mkdir(parents=True, exist_ok=True)
        writer = _ShardWriter(directory, self.key, self.dtype, self.views, len(self), None)
        for start in range(0, len(self), shard_size):
            stop = min(start + shard_size, len(self))
            writer(start, stop, self.features[:, start:stop].contiguous(), self.labels[start:stop].contiguous())
        return FeatureCache(self.features, self.labels, self.key, path=directory)


def _describe(value: object) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _check_extract_args(
    backbone: object,
    dataset: object,
    key: object,
    dtype: object,
    batch_size: object,
    shard_size: object,
    views: object,
    num_workers: object,
) -> None:
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}.")
    if not isinstance(dataset, Sized):
        raise TypeError(f"dataset must be a map-style Dataset with len(), got {type(dataset).__name__}.")
    if len(dataset) == 0:
        raise ValueError("dataset is empty (len(dataset) == 0); there is nothing to extract.")
    if not isinstance(key, CacheKey):
        raise TypeError(f"key must be a CacheKey, got {type(key).__name__} {key!r}.")
    if dtype not in FEATURE_DTYPES:
        names = ", ".join(f"torch.{_dtype_name(d)}" for d in FEATURE_DTYPES)
        raise ValueError(f"dtype={dtype!r} is not a feature storage dtype; use one of {names}.")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size), ("views", views)):
        if not _is_positive_int(value):
            raise ValueError(f"{name}={value!r} must be a positive int.")
    check_int("num_workers", num_workers, 0, " (0 loads in the main process)")
