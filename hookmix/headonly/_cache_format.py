"""The on-disk format of a feature cache: safetensors shards and a JSON manifest, written and checked.

On disk (``path=...``) a cache is a directory (or a prefix in object storage: :mod:`hookmix.headonly.store`, through
which every file here is read and written) of safetensors shards, ``shard-00000.safetensors``, ...,
each holding ``features`` ``(V, n, *F)`` and ``labels`` ``(n, ...)`` for a contiguous range of ``n``
examples, plus ``manifest.json`` (format version, the :class:`CacheKey` fields, dtype, shapes, count,
views, bytes per example, and each shard's row range, byte size and sha256). Every file is written
atomically (temp file in the same directory, then ``os.replace``) and the manifest is rewritten after
each completed shard, so an interrupted extraction resumes from its last complete shard; a kill may
leave a ``.*.tmp`` file behind, which is safe to delete while no process holds the lock. Loading reads only
JSON and safetensors (never pickle), checks every shard's size and checksum, and refuses any mismatch with
a ``ValueError`` that says what differs and how to fix it.

Writers and readers (:func:`hookmix.headonly.store.writer_lock`): a process that writes shards or a manifest
holds the directory's lock (``filelock`` on :data:`hookmix.headonly.store.LOCK_NAME`; the operating system
releases it when the process dies), so one process extends a cache at a time, and a writer appends shards
but never rewrites a published one. A complete cache therefore never changes: reading it needs no lock (a
read-only copy works), and a shard that fails its checksum was damaged after it was written, never a second
writer's valid work. A reader of an incomplete cache asks the lock whether a writer is at work before calling
it interrupted.

A shard is read by memory-mapping its file (:func:`map_shard`): the sha256 is computed over the mapping as
its pages come in — that pass is the read (in object storage: as its bytes stream into a local temp file, which
is then mapped) — and the tensors are views of the same mapping, so a caller
either copies them into one in-memory tensor (``FeatureCache.load``) or uses them for one block of a
streamed epoch and drops them (:mod:`hookmix.headonly.streaming`), which unmaps the file and returns its pages.
The safetensors header is parsed here (8-byte length, JSON, offsets) so that no byte is read twice.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import mmap
import re
import struct
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from hookmix.core.checks import is_int
from hookmix.core.errors import UsageError
from hookmix.headonly.store import LocalStore, Store, open_store

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
    "map_shard",
    "peek_labels",
    "parse_dtype",
    "parse_shard",
    "read_shard",
    "read_shards",
    "damaged_hint",
    "elsewhere_hint",
    "Shard",
    "shard_name",
    "ShardWriter",
]

FORMAT = "hookmix-feature-cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_BYTES = 64 * 2**10
"""Bytes read first when only a shard's labels are wanted: its header, and the labels when they fit."""

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


def elsewhere_hint(directory: Path | Store) -> str:
    """The fix for a cache that is valid but not the one asked for: it may be another run's work, so it is
    never to be deleted."""
    return f"extract into another directory ({directory} is left as it is: it may serve other runs)"


def damaged_hint(directory: Path | Store) -> str:
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
        cls,
        directory: Path | Store,
        key_type: type,
        name: str = MANIFEST_NAME,
        first_shard: int = 0,
        first_row: int = 0,
    ) -> Manifest:
        """Parse and validate ``directory/name`` (a path or a :class:`~hookmix.headonly.store.Store`; a remote
        cache's manifest or, before it is complete, its progress record), its key rebuilt as ``key_type``
        (CacheKey, whose module imports this one); ``ValueError`` when missing or invalid. ``first_shard`` /
        ``first_row``: where its shard list starts (not 0 for the part of one rank, see
        :func:`hookmix.headonly.distributed.extract_sharded`)."""
        directory = open_store(directory)
        path = directory.where(name)
        raw = directory.read(name)
        if raw is None:
            raise UsageError(
                f"no feature cache in {directory}: {MANIFEST_NAME} is missing; "
                "run FeatureCache.extract(..., path=...) to create it."
            )
        data = _json_object(raw, path, directory)
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


def _not_a_manifest(path: str, directory: Store, problem: Exception) -> str:
    return f"{path} is not a valid feature cache manifest ({problem}); {damaged_hint(directory)}."


def _json_object(raw: bytes, path: str, directory: Store) -> dict[str, Any]:
    """The JSON object in ``raw`` (read from ``path``); anything else is a damaged manifest."""
    try:
        data = json.loads(raw)
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
    directory: Path | Store,
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


def _header(head: bytes | mmap.mmap, size: int, path: str, directory: Store) -> tuple[int, dict[str, tuple]]:
    """Parse a safetensors header from the first bytes ``head`` of a file of ``size`` bytes: the offset of its
    data and each tensor's ``(dtype, shape, begin, end)``; every offset is checked against the file."""
    try:
        (length,) = struct.unpack("<Q", head[:8])
        if not 2 <= length <= size - 8:
            raise ValueError(f"header length {length} does not fit a file of {size} bytes")
        header = json.loads(bytes(head[8 : 8 + length]))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        header.pop("__metadata__", None)
        entries, base = {}, 8 + length
        for name, entry in header.items():
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if not (all(is_int(d, 0) for d in shape) and 0 <= begin <= end <= size - base):
                raise ValueError(f"tensor {name!r} has shape {shape} and offsets {begin}..{end} outside the file")
            if end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {name!r} of shape {shape} has {end - begin} bytes")
            entries[name] = (dtype, shape, begin, end)
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        raise UsageError(f"shard {path} is not a valid safetensors file ({exc}); {damaged_hint(directory)}.") from None
    return base, entries


def _tensors(mapping: mmap.mmap, path: str, directory: Store) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of ``mapping``."""
    base, entries = _header(mapping, len(mapping), path, directory)
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        count = math.prod(shape)
        flat = (
            torch.frombuffer(mapping, dtype=dtype, count=count, offset=base + begin)
            if count
            else torch.empty(0, dtype=dtype)
        )
        tensors[name] = flat.view(shape)
    return tensors


def _checked(
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    path: str,
    directory: Store,
    shard: Shard,
    manifest: Manifest,
) -> None:
    """Refuse a shard whose tensors (name: dtype and shape) are not those ``manifest`` implies for it."""
    rows = shard.stop - shard.start
    expected = {
        "features": (manifest.dtype, (manifest.views, rows, *manifest.feature_shape)),
        "labels": (manifest.label_dtype, (rows, *manifest.label_shape)),
    }
    if tensors != expected:
        raise UsageError(
            f"shard {path} holds {tensors}, but {MANIFEST_NAME} implies {expected}; {damaged_hint(directory)}."
        )


def map_shard(directory: Path | Store, shard: Shard, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """Map one shard, verify it (size, sha256, tensor names, dtypes, shapes) as its bytes are read, and return
    ``(features (V, n, *F), labels (n, ...))`` as views of the mapping: of the file itself in a local directory,
    of a local temp copy streamed in from object storage (:meth:`hookmix.headonly.store.Store.fetch`).

    The mapping lives as long as the returned tensors (or a view of them): drop them to unmap the file.
    A ``ValueError`` naming the shard and the fix when any check fails.
    """
    directory = open_store(directory)
    path = directory.where(shard.file)
    mapping = directory.fetch(shard.file, shard.bytes, shard.sha256, damaged_hint(directory), MANIFEST_NAME)
    tensors = _tensors(mapping, path, directory)
    _checked({name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}, path, directory, shard, manifest)
    return tensors["features"], tensors["labels"]


def read_shard(directory: Path | Store, shard: Shard, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`map_shard` with the tensors copied out of the mapping (which is closed on return)."""
    features, labels = map_shard(directory, shard, manifest)
    return features.clone(), labels.clone()


def read_shards(directory: Path | Store, manifest: Manifest) -> Iterator[tuple[Shard, torch.Tensor, torch.Tensor]]:
    """Each shard of ``manifest`` in order with its tensors (:func:`read_shard`). From object storage the next
    two shards are streamed in by background threads while the caller uses the current one, so at most three
    shards wait in local temp files; a local directory is read one shard after the other."""
    directory = open_store(directory)
    if isinstance(directory, LocalStore):
        yield from ((shard, *read_shard(directory, shard, manifest)) for shard in manifest.shards)
        return
    with ThreadPoolExecutor(2, thread_name_prefix="hookmix-fetch") as pool:
        ahead = deque(pool.submit(read_shard, directory, shard, manifest) for shard in manifest.shards[:2])
        try:
            for index, shard in enumerate(manifest.shards):
                if index + 2 < len(manifest.shards):
                    ahead.append(pool.submit(read_shard, directory, manifest.shards[index + 2], manifest))
                yield shard, *ahead.popleft().result()
        finally:  # a failed shard or a caller that stops: the reads not started yet are dropped
            for read in ahead:
                read.cancel()


def peek_labels(directory: Path | Store, shard: Shard, manifest: Manifest) -> torch.Tensor:
    """The labels ``(n, ...)`` of one shard, read without its features: its header, then the labels' bytes
    (one or two ranged reads of an object in object storage).

    Its size, header and shapes are checked, but not its checksum: that needs every byte, and is verified
    when the shard's features are read (:func:`map_shard`), before any of its rows is used.
    """
    directory = open_store(directory)
    path = directory.where(shard.file)
    with directory.open(shard.file, shard.bytes, damaged_hint(directory), MANIFEST_NAME) as file:
        head = file.read(min(shard.bytes, HEAD_BYTES))
        length = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        if len(head) < 8 + length <= shard.bytes:
            head += file.read(8 + length - len(head))
        base, entries = _header(head, shard.bytes, path, directory)
        _checked({name: entry[:2] for name, entry in entries.items()}, path, directory, shard, manifest)
        _, shape, begin, end = entries["labels"]
        if base + end <= len(head):
            data = head[base + begin : base + end]
        else:
            file.seek(base + begin)
            data = file.read(end - begin)
    if not data:  # labels of zero width, e.g. (n, 0)
        return torch.empty(shape, dtype=manifest.label_dtype)
    return torch.frombuffer(bytearray(data), dtype=manifest.label_dtype).view(shape)


class ShardWriter:
    """A sink that writes each range as the next shard, then rewrites the manifest (both atomically).

    ``first_shard`` / ``manifest_name``: the number of its first shard file and the name of the manifest it
    keeps; one rank of a sharded extraction writes its shards under their final names and its own manifest (an
    entry, never published as the cache's manifest; its shard replaces what an interrupted run left under that
    name, which no published manifest lists: :meth:`hookmix.headonly.store.Store.write`).
    ``directory``: a path, or a :class:`~hookmix.headonly.store.Store` (in object storage the manifest is
    published only once it is complete; see :meth:`hookmix.headonly.store.Store.publish`).
    """

    def __init__(
        self,
        directory: Path | Store,
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
        self.directory = open_store(directory)
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
        entry = self.manifest_name != MANIFEST_NAME  # a rank's part of a sharded extraction
        self.directory.write(name, data, replace=entry)
        shard = Shard(name, start, stop, len(data), hashlib.sha256(data).hexdigest())
        self.manifest = replace(manifest, shards=(*shards, shard))
        complete = self.manifest.complete and not entry
        self.directory.publish(self.manifest_name, self.manifest.to_json(), complete=complete)


def check_consistent(before: Manifest, now: Manifest, directory: Path | Store) -> None:
    """Refuse new rows whose feature / label layout differs from the shards already stored."""
    for name in ("feature_shape", "label_dtype", "label_shape"):
        if getattr(before, name) != getattr(now, name):
            raise UsageError(
                f"rows from {before.rows_done} have {name}={getattr(now, name)}, but the shards already in "
                f"{directory} have {name}={getattr(before, name)}: the backbone or the data changed while the "
                f"CacheKey stayed the same; give the key what tells them apart, or {elsewhere_hint(directory)}."
            )
