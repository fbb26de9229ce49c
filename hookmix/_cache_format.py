"""The on-disk format of a feature cache: safetensors shards and a JSON manifest, written and checked.

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
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from hookmix._checks import is_int
from hookmix._errors import UsageError
from hookmix._io import atomic_write

__all__ = [
    "bytes_per_example",
    "check_consistent",
    "check_request",
    "dtype_name",
    "FEATURE_DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "hookmix_version",
    "Manifest",
    "MANIFEST_NAME",
    "parse_dtype",
    "parse_shard",
    "read_shard",
    "rebuild_hint",
    "Shard",
    "shard_name",
    "ShardWriter",
]

FORMAT = "hookmix-feature-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# One completed shard hands (start, stop, features (V, n, *F), labels (n, ...)) to a sink.
Sink = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bytes_per_example(views: int, feature_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return views * math.prod(feature_shape) * dtype.itemsize


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def hookmix_version() -> str:
    try:
        return importlib.metadata.version("hookmix")
    except importlib.metadata.PackageNotFoundError:
        return getattr(sys.modules.get("hookmix"), "__version__", "unknown")


def rebuild_hint(directory: Path) -> str:
    return f"delete {directory} (or use another --cache directory) and extract again"


@dataclass(frozen=True)
class Shard:
    file: str
    start: int
    stop: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json``; ``shards`` cover rows ``[0, rows_done)`` in order."""

    key: Any  # a hookmix.cache.CacheKey: as_dict(), fingerprint()
    dtype: torch.dtype
    feature_shape: tuple[int, ...]
    label_dtype: torch.dtype
    label_shape: tuple[int, ...]
    count: int
    views: int
    shards: tuple[Shard, ...]
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
                "dtype": dtype_name(self.dtype),
                "feature_shape": list(self.feature_shape),
                "label_dtype": dtype_name(self.label_dtype),
                "label_shape": list(self.label_shape),
                "count": self.count,
                "views": self.views,
                "bytes_per_example": bytes_per_example(self.views, self.feature_shape, self.dtype),
                "shards": [vars(shard) for shard in self.shards],
            },
            indent=2,
        ).encode()

    @classmethod
    def read(cls, directory: Path, key_type: type) -> Manifest:
        """Parse and validate ``directory/manifest.json``, its key rebuilt as ``key_type`` (CacheKey, whose
        module imports this one); ``ValueError`` when missing or invalid."""
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise UsageError(
                f"no feature cache in {directory}: {MANIFEST_NAME} is missing; "
                "run FeatureCache.extract(..., path=...) to create it."
            )
        try:
            data = json.loads(path.read_bytes())
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            if _get(data, "format", str) != FORMAT or _get(data, "format_version", int) != FORMAT_VERSION:
                raise UsageError(
                    f"format {data['format']!r} version {data['format_version']!r} is not "
                    f"{FORMAT!r} version {FORMAT_VERSION}"
                )
            key_data = _get(data, "key", dict)
            manifest = cls(
                key=key_type(**{f.name: _get(key_data, f.name, object) for f in fields(key_type)}),
                dtype=parse_dtype(_get(data, "dtype", str)),
                feature_shape=_shape(_get(data, "feature_shape", list)),
                label_dtype=parse_dtype(_get(data, "label_dtype", str)),
                label_shape=_shape(_get(data, "label_shape", list)),
                count=_get(data, "count", int),
                views=_get(data, "views", int),
                shards=tuple(parse_shard(s) for s in _get(data, "shards", list)),
                created=_get(data, "created", str),
                hookmix_version=_get(data, "hookmix_version", str),
            )
            manifest._check_layout()
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(
                f"{path} is not a valid feature cache manifest ({exc}); {rebuild_hint(directory)}."
            ) from exc
        return manifest

    def _check_layout(self) -> None:
        if self.dtype not in FEATURE_DTYPES or self.count < 1 or self.views < 1:
            raise UsageError(f"dtype={self.dtype}, count={self.count}, views={self.views} out of range")
        previous_stop = 0
        for index, shard in enumerate(self.shards):
            if (
                shard.file != shard_name(index)
                or shard.start != previous_stop
                or not (shard.start < shard.stop <= self.count)
            ):
                raise UsageError(f"shard entry {index} {vars(shard)} breaks the contiguous shard layout")
            previous_stop = shard.stop


def _get(data: dict[str, Any], name: str, kind: type) -> Any:
    if name not in data:
        raise UsageError(f"missing field {name!r}")
    value = data[name]
    if not (is_int(value) if kind is int else isinstance(value, kind)):
        raise TypeError(f"field {name!r} should be {kind.__name__}, got {value!r}")
    return value


def _shape(values: list[Any]) -> tuple[int, ...]:
    if not all(is_int(v, 0) for v in values):
        raise UsageError(f"shape {values!r} must hold non-negative ints")
    return tuple(values)


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"{name!r} is not a torch dtype")
    return dtype


def parse_shard(data: object) -> Shard:
    if not isinstance(data, dict):
        raise TypeError(f"shard entry should be an object, got {data!r}")
    shard = Shard(
        file=_get(data, "file", str),
        start=_get(data, "start", int),
        stop=_get(data, "stop", int),
        bytes=_get(data, "bytes", int),
        sha256=_get(data, "sha256", str),
    )
    if not re.fullmatch(r"[0-9a-f]{64}", shard.sha256):
        raise UsageError(f"shard {shard.file!r} has an invalid sha256 {shard.sha256!r}")
    return shard


def check_request(
    manifest: Manifest,
    directory: Path,
    key: Any,
    *,
    dtype: torch.dtype | None,
    views: int | None,
    count: int | None,
) -> None:
    """Refuse a stored cache whose key, dtype, views or count differ from the requested ones."""
    if not isinstance(key, type(manifest.key)):
        raise TypeError(f"key must be a CacheKey, got {type(key).__name__} {key!r}.")
    stored: dict[str, Any] = {f.name: getattr(manifest.key, f.name) for f in fields(key)}
    requested: dict[str, Any] = {f.name: getattr(key, f.name) for f in fields(key)}
    stored.update(dtype=dtype_name(manifest.dtype), views=manifest.views, count=manifest.count)
    requested.update(dtype=None if dtype is None else dtype_name(dtype), views=views, count=count)
    for name, want in requested.items():
        if want is not None and stored[name] != want:
            raise UsageError(
                f"the feature cache in {directory} was built for {name}={stored[name]!r}, but "
                f"{name}={want!r} was requested; use another --cache directory, or "
                f"delete {directory} to extract again."
            )


def read_shard(directory: Path, shard: Shard, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify one shard (size, sha256, tensor names, dtypes, shapes) and return (features, labels)."""
    path = directory / shard.file
    fix = rebuild_hint(directory)
    if not path.is_file():
        raise UsageError(f"shard {path} listed in {MANIFEST_NAME} is missing; {fix}.")
    size = path.stat().st_size
    if size != shard.bytes:
        raise UsageError(f"shard {path} is {size} bytes but {MANIFEST_NAME} says {shard.bytes} (truncated?); {fix}.")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        raise UsageError(
            f"shard {path} fails its checksum (sha256 {digest[:12]}..., {MANIFEST_NAME} says "
            f"{shard.sha256[:12]}...): the file is corrupted or was altered; {fix}."
        )
    try:
        tensors = load_safetensors(data)
    except SafetensorError as exc:
        raise UsageError(f"shard {path} is not a valid safetensors file ({exc}); {fix}.") from exc
    rows = shard.stop - shard.start
    expected = {
        "features": (manifest.dtype, (manifest.views, rows, *manifest.feature_shape)),
        "labels": (manifest.label_dtype, (rows, *manifest.label_shape)),
    }
    found = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    if found != expected:
        raise UsageError(f"shard {path} holds {found}, but {MANIFEST_NAME} implies {expected}; {fix}.")
    return tensors["features"], tensors["labels"]


class ShardWriter:
    """A sink that writes each range as the next shard, then rewrites the manifest (both atomically)."""

    def __init__(
        self,
        directory: Path,
        key: Any,
        dtype: torch.dtype,
        views: int,
        count: int,
        previous: Manifest | None,
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
        manifest = Manifest(
            key=self.key,
            dtype=self.dtype,
            feature_shape=tuple(features.shape[2:]),
            label_dtype=labels.dtype,
            label_shape=tuple(labels.shape[1:]),
            count=self.count,
            views=self.views,
            shards=shards,
            created=self.created,
            hookmix_version=hookmix_version(),
        )
        if self.manifest is not None:
            check_consistent(self.manifest, manifest, self.directory)
        data = save_safetensors({"features": features, "labels": labels})
        name = shard_name(len(shards))
        atomic_write(self.directory / name, data)
        shard = Shard(name, start, stop, len(data), hashlib.sha256(data).hexdigest())
        self.manifest = replace(manifest, shards=(*shards, shard))
        atomic_write(self.directory / MANIFEST_NAME, self.manifest.to_json())


def check_consistent(before: Manifest, now: Manifest, directory: Path) -> None:
    """Refuse new rows whose feature / label layout differs from the shards already stored."""
    for name in ("feature_shape", "label_dtype", "label_shape"):
        if getattr(before, name) != getattr(now, name):
            raise UsageError(
                f"rows from {before.rows_done} have {name}={getattr(now, name)}, but the shards already in "
                f"{directory} have {name}={getattr(before, name)}; {rebuild_hint(directory)}."
            )
