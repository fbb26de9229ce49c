"""The on-disk format of a feature cache: safetensors shards and a JSON manifest, written and checked.

On disk (``path=...``) a cache is a directory of safetensors shards, ``shard-00000.safetensors``, ...,
each holding ``features`` ``(V, n, *F)`` and ``labels`` ``(n, ...)`` for a contiguous range of ``n``
examples, plus ``manifest.json`` (format version, the :class:`CacheKey` fields, dtype, shapes, count,
views, bytes per example, and each shard's row range, byte size and sha256). Every file is written
atomically (temp file in the same directory, then ``os.replace``) and the manifest is rewritten after
each completed shard, so an interrupted extraction resumes from its last complete shard; a kill may
leave a ``.*.tmp`` file behind, which is safe to delete while no process holds the lock. Loading reads only
JSON and safetensors (never pickle), checks every shard's size and checksum, and refuses any mismatch with
a ``ValueError`` that says what differs and how to fix it.

Writers and readers (:func:`writer_lock`): a process that writes shards or a manifest holds the directory's
lock (``filelock`` on :data:`LOCK_NAME`; the operating system releases it when the process dies), so one
process extends a cache at a time, and a writer appends shards but never rewrites a published one. A
complete cache therefore never changes: reading it needs no lock (a read-only copy works), and a shard
that fails its checksum was damaged after it was written, never a second writer's valid work. A reader
of an incomplete cache asks the lock whether a writer is at work before calling it interrupted.

A shard is read by memory-mapping its file (:func:`map_shard`): the sha256 is computed over the mapping as
its pages come in — that pass is the read — and the tensors are views of the same mapping, so a caller
either copies them into one in-memory tensor (``FeatureCache.load``) or uses them for one block of a
streamed epoch and drops them (:mod:`hookmix.headonly.streaming`), which unmaps the file and returns its pages.
The safetensors header is parsed here (8-byte length, JSON, offsets) so that no byte is read twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import mmap
import re
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors.torch import save as save_safetensors

from hookmix.core.checks import is_int
from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write

__all__ = [
    "bytes_per_example",
    "check_consistent",
    "check_request",
    "dtype_name",
    "FEATURE_DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "hookmix_version",
    "LOCK_NAME",
    "Manifest",
    "MANIFEST_NAME",
    "map_shard",
    "peek_labels",
    "parse_dtype",
    "parse_shard",
    "read_shard",
    "damaged_hint",
    "elsewhere_hint",
    "Shard",
    "shard_name",
    "ShardWriter",
    "writer_active",
    "writer_lock",
]

FORMAT = "hookmix-feature-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".writer.lock"
"""The file whose lock a writer of the directory holds (hidden, like the temp files)."""
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# One completed shard hands (start, stop, features (V, n, *F), labels (n, ...)) to a sink.
Sink = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bytes_per_example(views: int, feature_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """The bytes one example takes in a cache: ``views`` stored features of ``feature_shape`` in ``dtype``."""
    return views * math.prod(feature_shape) * dtype.itemsize


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def hookmix_version() -> str:
    try:
        return importlib.metadata.version("hookmix")
    except importlib.metadata.PackageNotFoundError:
        return getattr(sys.modules.get("hookmix"), "__version__", "unknown")


@contextlib.contextmanager
def writer_lock(directory: Path, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``directory``'s writer lock for the ``with`` block, waiting for another writer to finish first;
    ``on_wait`` gets one line saying so when the lock is busy (a second process would otherwise look hung)."""
    lock = FileLock(directory / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait(f"waiting for another process that is writing the feature cache in {directory}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def writer_active(directory: Path) -> bool:
    """Whether a process holds ``directory``'s writer lock now (``False`` when the lock cannot be taken for
    another reason, e.g. a read-only copy, where no hookmix writer can be at work)."""
    lock = FileLock(directory / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:
        return False
    lock.release()
    return False


def elsewhere_hint(directory: Path) -> str:
    """The fix for a cache that is valid but not the one asked for: it may be another run's work, so it is
    never to be deleted."""
    return f"extract into another directory ({directory} is left as it is: it may serve other runs)"


def damaged_hint(directory: Path) -> str:
    """The fix for files changed after they were published. Writers hold the directory's lock and never rewrite
    a published file, so this is damage (a disk fault, an edit, a copy cut short), not another writer at work;
    still, nothing is deleted here and the advice to remove waits until no process uses the directory."""
    return (
        f"{directory} was left as it is: extract into another directory, or remove {directory} once no process "
        "uses it and extract again"
    )


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

    key: Any  # a hookmix.CacheKey: as_dict(), fingerprint()
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

    @property
    def stored_bytes(self) -> int:
        """Bytes of all shard files listed (features and labels)."""
        return sum(shard.bytes for shard in self.shards)

    @classmethod
    def read(
        cls, directory: Path, key_type: type, name: str = MANIFEST_NAME, first_shard: int = 0, first_row: int = 0
    ) -> Manifest:
        """Parse and validate ``directory/name``, its key rebuilt as ``key_type`` (CacheKey, whose module
        imports this one); ``ValueError`` when missing or invalid. ``first_shard`` / ``first_row``: where its
        shard list starts (not 0 for the part of one rank, see :func:`hookmix.headonly.distributed.extract_sharded`)."""
        path = directory / name
        if not path.is_file():
            raise UsageError(
                f"no feature cache in {directory}: {MANIFEST_NAME} is missing; "
                "run FeatureCache.extract(..., path=...) to create it."
            )
        data = _json_object(path, directory)
        if data.get("format") == FORMAT and data.get("format_version") != FORMAT_VERSION:
            raise UsageError(
                f"{path} is a feature cache of format version {data.get('format_version')!r} (written by hookmix "
                f"{data.get('hookmix_version', 'of an unknown version')}), but this hookmix {hookmix_version()} "
                f"reads version {FORMAT_VERSION}; {elsewhere_hint(directory)}."
            )
        try:
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
            manifest._check_layout(first_shard, first_row)
        except (ValueError, TypeError) as exc:
            raise UsageError(_not_a_manifest(path, directory, exc)) from exc
        return manifest

    def _check_layout(self, first_shard: int, first_row: int) -> None:
        if self.dtype not in FEATURE_DTYPES or self.count < 1 or self.views < 1:
            raise UsageError(f"dtype={self.dtype}, count={self.count}, views={self.views} out of range")
        previous_stop = first_row
        for index, shard in enumerate(self.shards, start=first_shard):
            if (
                shard.file != shard_name(index)
                or shard.start != previous_stop
                or not (shard.start < shard.stop <= self.count)
            ):
                raise UsageError(f"shard entry {index} {vars(shard)} breaks the contiguous shard layout")
            previous_stop = shard.stop


def _not_a_manifest(path: Path, directory: Path, problem: Exception) -> str:
    return f"{path} is not a valid feature cache manifest ({problem}); {damaged_hint(directory)}."


def _json_object(path: Path, directory: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a file that cannot be read or is no JSON object is a damaged manifest."""
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(_not_a_manifest(path, directory, exc)) from exc
    return data


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
                f"{name}={want!r} was requested; {elsewhere_hint(directory)}."
            )


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _open_shard(directory: Path, shard: Shard, whole: bool) -> mmap.mmap:
    """A private mapping of the shard's file, after checking it exists and has the listed size; ``whole``:
    every byte will be read next, so the kernel is asked to start reading them all now."""
    path = directory / shard.file
    fix = damaged_hint(directory)
    try:
        with open(path, "rb") as file:
            size = path.stat().st_size
            if size != shard.bytes:
                raise UsageError(
                    f"shard {path} is {size} bytes but {MANIFEST_NAME} says {shard.bytes} (truncated?); {fix}."
                )
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)  # writable view: no torch warning
    except FileNotFoundError:
        raise UsageError(f"shard {path} listed in {MANIFEST_NAME} is missing; {fix}.") from None
    if whole and hasattr(mmap, "MADV_WILLNEED"):
        mapping.madvise(mmap.MADV_WILLNEED)
    return mapping


def _tensors(mapping: mmap.mmap, path: Path, directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of ``mapping``; every offset is checked against the file."""
    try:
        (length,) = struct.unpack("<Q", mapping[:8])
        if not 2 <= length <= len(mapping) - 8:
            raise ValueError(f"header length {length} does not fit a file of {len(mapping)} bytes")
        header = json.loads(bytes(mapping[8 : 8 + length]))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        tensors, base = {}, 8 + length
        for name, entry in header.items():
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            count = math.prod(shape)
            if not (all(is_int(d, 0) for d in shape) and 0 <= begin <= end <= len(mapping) - base):
                raise ValueError(f"tensor {name!r} has shape {shape} and offsets {begin}..{end} outside the file")
            if end - begin != count * dtype.itemsize:
                raise ValueError(f"tensor {name!r} of shape {shape} has {end - begin} bytes")
            flat = (
                torch.frombuffer(mapping, dtype=dtype, count=count, offset=base + begin)
                if count
                else torch.empty(0, dtype=dtype)
            )
            tensors[name] = flat.view(shape)
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise UsageError(f"shard {path} is not a valid safetensors file ({exc}); {damaged_hint(directory)}.") from None
    return tensors


def _checked(
    tensors: dict[str, torch.Tensor],
    path: Path,
    directory: Path,
    shard: Shard,
    manifest: Manifest,
    names: tuple[str, ...],
) -> tuple[torch.Tensor, ...]:
    rows = shard.stop - shard.start
    expected = {
        "features": (manifest.dtype, (manifest.views, rows, *manifest.feature_shape)),
        "labels": (manifest.label_dtype, (rows, *manifest.label_shape)),
    }
    found = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    if found != expected:
        raise UsageError(
            f"shard {path} holds {found}, but {MANIFEST_NAME} implies {expected}; {damaged_hint(directory)}."
        )
    return tuple(tensors[name] for name in names)


def map_shard(directory: Path, shard: Shard, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory-map one shard, verify it (size, sha256, tensor names, dtypes, shapes) as its bytes are read,
    and return ``(features (V, n, *F), labels (n, ...))`` as views of the mapping.

    The mapping lives as long as the returned tensors (or a view of them): drop them to unmap the file.
    A ``ValueError`` naming the shard and the fix when any check fails.
    """
    path = directory / shard.file
    mapping = _open_shard(directory, shard, whole=True)
    digest = hashlib.sha256(mapping).hexdigest()  # releases the GIL: a prefetch thread reads while training runs
    if digest != shard.sha256:
        raise UsageError(
            f"shard {path} fails its checksum (sha256 {digest[:12]}..., {MANIFEST_NAME} says "
            f"{shard.sha256[:12]}...): its bytes changed after it was written; {damaged_hint(directory)}."
        )
    features, labels = _checked(
        _tensors(mapping, path, directory), path, directory, shard, manifest, ("features", "labels")
    )
    return features, labels


def read_shard(directory: Path, shard: Shard, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`map_shard` with the tensors copied out of the mapping (which is closed on return)."""
    features, labels = map_shard(directory, shard, manifest)
    return features.clone(), labels.clone()


def peek_labels(directory: Path, shard: Shard, manifest: Manifest) -> torch.Tensor:
    """The labels ``(n, ...)`` of one shard, copied out of its mapping without reading its features.

    Its size, header and shapes are checked, but not its checksum: that needs every byte, and is verified
    when the shard's features are read (:func:`map_shard`), before any of its rows is used.
    """
    path = directory / shard.file
    (labels,) = _checked(
        _tensors(_open_shard(directory, shard, whole=False), path, directory),
        path,
        directory,
        shard,
        manifest,
        ("labels",),
    )
    return labels.clone()


class ShardWriter:
    """A sink that writes each range as the next shard, then rewrites the manifest (both atomically).

    ``first_shard`` / ``manifest_name``: the number of its first shard file and the name of the manifest it
    keeps; one rank of a sharded extraction writes its shards under their final names and its own manifest.
    """

    def __init__(
        self,
        directory: Path,
        key: Any,
        dtype: torch.dtype,
        views: int,
        count: int,
        previous: Manifest | None,
        *,
        first_shard: int = 0,
        manifest_name: str = MANIFEST_NAME,
    ) -> None:
        self.first_shard = first_shard
        self.manifest_name = manifest_name
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
        name = shard_name(self.first_shard + len(shards))
        atomic_write(self.directory / name, data)
        shard = Shard(name, start, stop, len(data), hashlib.sha256(data).hexdigest())
        self.manifest = replace(manifest, shards=(*shards, shard))
        atomic_write(self.directory / self.manifest_name, self.manifest.to_json())


def check_consistent(before: Manifest, now: Manifest, directory: Path) -> None:
    """Refuse new rows whose feature / label layout differs from the shards already stored."""
    for name in ("feature_shape", "label_dtype", "label_shape"):
        if getattr(before, name) != getattr(now, name):
            raise UsageError(
                f"rows from {before.rows_done} have {name}={getattr(now, name)}, but the shards already in "
                f"{directory} have {name}={getattr(before, name)}: the backbone or the data changed while the "
                f"CacheKey stayed the same; give the key what tells them apart, or {elsewhere_hint(directory)}."
            )
