"""Where the files of one feature cache live: a local directory, or a prefix in object storage (any fsspec URL).

The cache format (:mod:`hookmix.headonly._cache_format`) reads and writes a cache's shards and manifest only
through a :class:`Store`; :func:`open_store` picks one for a location:

* :class:`LocalStore` (a path, or ``file://``): what the format always did — files written atomically (temp file
  and ``os.replace``), a writer holds the directory's ``filelock``, shards are memory-mapped and hashed over the
  mapping as its pages come in.
* :class:`RemoteStore` (``s3://bucket/prefix``, ``gs://...``, any URL fsspec knows; ``pip install
  'hookmix[cloud]'`` for s3): the same names under the prefix. An object store has no rename and no lock, so
  the manifest is published once, when the cache is complete (``mode="create"``: ``If-None-Match: *`` on S3),
  and until then the progress lives in ``manifest.json.partial``: a reader of ``manifest.json`` never sees a
  half-written cache, and an interrupted extraction resumes from the progress record. A shard is written
  whole by one request (a multipart upload appears only when completed) and never replaced by other bytes.
  Reading streams a shard into an unlinked local temp file (``$TMPDIR``) while its sha256 is computed and its
  bytes counted, then maps that file: a short or changed object is refused before any of its rows is used,
  and its disk space is returned when the mapping is dropped.

Failures of the storage library (a refused credential, a server that went away, a missing bucket) become one
:class:`StoreError` naming the object's URL and the likely fix. Retries and timeouts are those of the
storage library (for S3: ``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``, or fsspec's ``FSSPEC_S3`` settings).

Imports no torch, so the command line checks a ``--cache`` URL before it loads a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from filelock import FileLock, Timeout

from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write

__all__ = [
    "check_location",
    "is_remote",
    "is_url",
    "join",
    "local_path",
    "LocalStore",
    "LOCK_NAME",
    "open_store",
    "PARTIAL_SUFFIX",
    "RemoteStore",
    "Store",
    "StoreError",
    "writer_active",
    "writer_lock",
]

LOCK_NAME = ".writer.lock"
"""The file whose lock a writer of a local cache directory holds (hidden, like the temp files)."""
PARTIAL_SUFFIX = ".partial"
"""Appended to a manifest's name for the progress record of a remote cache that is not complete yet."""
CHUNK = 8 * 2**20
"""Bytes per request when a remote shard is streamed in."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class StoreError(UsageError, OSError):
    """A request to object storage that failed (refused credentials, a server that does not answer, a missing
    bucket, an object that exists with other bytes): the message names the object's URL, what went wrong and
    how to fix it. A :class:`~hookmix.UsageError` (the command line prints one line, exit 2) and an ``OSError``
    (code that catches I/O errors keeps working). A shard that is missing, short or changed is a plain
    ``UsageError`` with the same wording as in a local directory."""


def is_url(location: str | Path) -> bool:
    """Whether ``location`` is a URL with a scheme (``s3://...``) rather than a local path."""
    return isinstance(location, str) and _URL.match(location) is not None


def is_remote(location: str | Path) -> bool:
    """Whether ``location`` names object storage: a URL whose scheme is not ``file://``."""
    return is_url(location) and not str(location).startswith("file://")


def local_path(location: str | Path) -> Path:
    """A local location as a ``Path`` (``file:///data/cache`` -> ``/data/cache``)."""
    return Path(str(location).removeprefix("file://"))


def join(root: str | Path, name: str) -> str | Path:
    """``root/name``: a ``Path`` under a local root, a URL under a URL (``Path`` would fold its ``//``)."""
    return f"{root.rstrip('/')}/{name}" if is_url(root) else Path(root) / name


def check_location(flag: str, location: str) -> None:
    """Refuse a URL whose storage library is not installed, at once and in one line naming ``flag`` (the
    command line's option, ``--cache``: the caller names it, this library does not know its flags)."""
    if is_remote(location):
        _filesystem_class(location, f"{flag} {location}")


def _filesystem_class(url: str, named: str) -> type:
    """fsspec's file-system class for ``url``; a missing storage library or an unknown protocol is one
    :class:`~hookmix.UsageError` about ``named`` (the URL, or the flag that gave it)."""
    protocol = url.split("://", 1)[0]
    try:
        import fsspec

        return fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise UsageError(
            f"{named} needs a storage library for {protocol}:// ({exc}); for s3:// install "
            "'hookmix[cloud]' (fsspec and s3fs), for gs:// gcsfs."
        ) from None
    except ValueError:
        raise UsageError(f"{named}: fsspec knows no protocol {protocol!r}; give a local path or e.g. s3://.")


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


class Store(ABC):
    """The objects of one cache under one location; names are file names (``manifest.json``, shards).

    ``fix``/``listed_in`` arguments go into the messages of a shard that is missing, short or changed: what to
    do about it, and the manifest that lists it.
    """

    path: str | Path
    """The location as the user gave it: a ``Path``, or a URL."""

    def __str__(self) -> str:
        return str(self.path)

    def where(self, name: str) -> str:
        """The path or URL of object ``name``, for messages."""
        return str(join(self.path, name))

    @abstractmethod
    def read(self, name: str) -> bytes | None:
        """The bytes of a small object (a manifest, complete or not), ``None`` when there is none."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether :meth:`read` would find object ``name``."""

    @abstractmethod
    def names(self) -> set[str]:
        """The names :meth:`read` finds under this location now (one listing, not a request per name)."""

    @abstractmethod
    def write(self, name: str, data: bytes, *, replace: bool = False) -> None:
        """Store a shard: readers see all of ``data`` or nothing. ``replace``: the caller knows that no published
        manifest lists ``name`` (a shard of an unfinished extraction shared by ranks), so other bytes already
        there are an interrupted run's and are replaced."""

    @abstractmethod
    def discard(self, name: str) -> None:
        """Remove object ``name`` (and its progress record) if there is one."""

    @abstractmethod
    def publish(self, name: str, data: bytes, *, complete: bool) -> None:
        """Store a manifest; ``complete``: it lists every row, the cache is published."""

    @abstractmethod
    def open(self, name: str, size: int, fix: str, listed_in: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """Object ``name`` for reading, after checking that it exists and holds ``size`` bytes."""

    @abstractmethod
    def fetch(self, name: str, size: int, sha256: str, fix: str, listed_in: str) -> mmap.mmap:
        """A private mapping of object ``name`` whose size and sha256 were checked as its bytes were read."""

    @abstractmethod
    def prepare(self) -> None:
        """Make the location ready to receive objects (a local directory is created)."""

    @abstractmethod
    def lock(self, on_wait: Callable[[str], None] | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold the right to write this cache for the ``with`` block (see :func:`writer_lock`)."""

    @abstractmethod
    def active(self) -> bool:
        """Whether another process is writing this cache now, as far as the store can tell."""


# A shard that is missing, short or changed is damage, not a failed request: a UsageError, locally as remotely.
def _missing(where: str, fix: str, listed_in: str) -> UsageError:
    return UsageError(f"shard {where} listed in {listed_in} is missing; {fix}.")


def _short(where: str, size: int, expected: int, fix: str, listed_in: str) -> UsageError:
    return UsageError(f"shard {where} is {size} bytes but {listed_in} says {expected} (truncated?); {fix}.")


def _check_digest(where: str, digest: str, expected: str, fix: str, listed_in: str) -> None:
    if digest != expected:
        raise UsageError(
            f"shard {where} fails its checksum (sha256 {digest[:12]}..., {listed_in} says "
            f"{expected[:12]}...): its bytes changed after it was written; {fix}."
        )


class LocalStore(Store):
    """A cache directory on a local file system: atomic renames, a ``filelock``, memory maps."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory)

    def read(self, name: str) -> bytes | None:
        path = self.path / name
        return path.read_bytes() if path.is_file() else None

    def exists(self, name: str) -> bool:
        return (self.path / name).exists()

    def names(self) -> set[str]:
        return {path.name for path in self.path.iterdir()} if self.path.is_dir() else set()

    def write(self, name: str, data: bytes, *, replace: bool = False) -> None:
        atomic_write(self.path / name, data)  # the writer's lock is held: the bytes there are this writer's

    def discard(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def publish(self, name: str, data: bytes, *, complete: bool) -> None:
        atomic_write(self.path / name, data)  # a reader tells an incomplete manifest by its rows

    @contextlib.contextmanager
    def open(self, name: str, size: int, fix: str, listed_in: str) -> Iterator[IO[bytes]]:
        path = self.path / name
        try:
            file = open(path, "rb")
        except FileNotFoundError:
            raise _missing(str(path), fix, listed_in) from None
        with file:
            found = path.stat().st_size
            if found != size:
                raise _short(str(path), found, size, fix, listed_in)
            yield file

    def fetch(self, name: str, size: int, sha256: str, fix: str, listed_in: str) -> mmap.mmap:
        """The file mapped; the kernel is asked to read all of it now, and the hash over the mapping is that read
        (it releases the GIL: a prefetch thread reads while training runs)."""
        with self.open(name, size, fix, listed_in) as file:
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)  # writable view: no torch warning
        if hasattr(mmap, "MADV_WILLNEED"):
            mapping.madvise(mmap.MADV_WILLNEED)
        _check_digest(self.where(name), hashlib.sha256(mapping).hexdigest(), sha256, fix, listed_in)
        return mapping

    def prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def lock(self, on_wait: Callable[[str], None] | None = None) -> contextlib.AbstractContextManager[None]:
        return writer_lock(self.path, on_wait)

    def active(self) -> bool:
        return self.path.is_dir() and writer_active(self.path)


class RemoteStore(Store):
    """A cache under a URL prefix in object storage, through fsspec (see the module's docstring)."""

    def __init__(self, url: str) -> None:
        _filesystem_class(url, f"the cache URL {url}")
        import fsspec

        self.path = url.rstrip("/")
        # No listing cache: a listing taken before a manifest was published must not hide it.
        self.fs, self._root = fsspec.core.url_to_fs(self.path, use_listings_cache=False)

    def _key(self, name: str) -> str:
        return f"{self._root}/{name}"

    @contextlib.contextmanager
    def _io(self, name: str, doing: str, passed: type[OSError] | None = None) -> Iterator[None]:
        """Turn a failure of the storage library while ``doing`` object ``name`` into one :class:`StoreError`;
        ``passed``: an error the caller handles (``FileNotFoundError``: no such object), raised as it is."""
        try:
            yield
        except UsageError:
            raise
        except Exception as exc:  # the library's own errors (botocore, aiohttp, OSError ...): all are I/O here
            if passed is not None and isinstance(exc, passed):
                raise
            raise StoreError(f"{doing} {self.where(name)} failed: {_describe(exc)}; {_advice(exc)}.") from exc

    def read(self, name: str) -> bytes | None:
        for key in (name, name + PARTIAL_SUFFIX):
            with contextlib.suppress(FileNotFoundError), self._io(key, "reading", FileNotFoundError):
                return self.fs.cat_file(self._key(key))
        return None

    def exists(self, name: str) -> bool:
        with self._io(name, "looking for"):
            return any(self.fs.exists(self._key(key)) for key in (name, name + PARTIAL_SUFFIX))

    def names(self) -> set[str]:
        with self._io("", "listing"):
            try:
                found = self.fs.ls(self._root, detail=False)
            except FileNotFoundError:  # nothing under the prefix yet
                return set()
        return {path.rstrip("/").rsplit("/", 1)[-1].removesuffix(PARTIAL_SUFFIX) for path in found}

    def write(self, name: str, data: bytes, *, replace: bool = False) -> None:
        """Write ``data`` once: an object already there (an interrupted run's, or another writer's at work) is
        kept when it holds the same bytes and refused otherwise, so a published shard never changes. With
        ``replace`` (no published manifest lists ``name``) the object is put whatever is there."""
        if replace:
            with self._io(name, "writing"):
                self.fs.pipe_file(self._key(name), data)
            return
        try:
            with self._io(name, "writing", FileExistsError):
                self.fs.pipe_file(self._key(name), data, mode="create")
        except FileExistsError:
            with self._io(name, "reading"), self.fs.open(self._key(name), "rb", block_size=CHUNK) as file:
                same = _stream(file, None) == hashlib.sha256(data).hexdigest()
            if not same:
                raise StoreError(
                    f"shard {self.where(name)} already exists with other bytes: another process may be extracting "
                    f"this cache now, or an interrupted one left it; extract into another prefix, or "
                    f"remove {self.where(name)} once no process writes this cache."
                ) from None

    def publish(self, name: str, data: bytes, *, complete: bool) -> None:
        """An incomplete manifest goes to the progress record; the complete one is created once (a second
        writer finds it there and leaves it: its shards hold the same bytes, see :meth:`write`)."""
        partial = name + PARTIAL_SUFFIX
        if not complete:
            with self._io(partial, "writing"):
                self.fs.pipe_file(self._key(partial), data)
            return
        with contextlib.suppress(FileExistsError), self._io(name, "publishing", FileExistsError):
            self.fs.pipe_file(self._key(name), data, mode="create")
        with contextlib.suppress(FileNotFoundError), self._io(partial, "removing", FileNotFoundError):
            self.fs.rm_file(self._key(partial))

    def discard(self, name: str) -> None:
        for key in (name, name + PARTIAL_SUFFIX):
            with contextlib.suppress(FileNotFoundError), self._io(key, "removing", FileNotFoundError):
                self.fs.rm_file(self._key(key))

    @contextlib.contextmanager
    def open(self, name: str, size: int, fix: str, listed_in: str) -> Iterator[IO[bytes]]:
        where = self.where(name)
        try:
            with self._io(name, "reading", FileNotFoundError):
                file = self.fs.open(self._key(name), "rb", block_size=CHUNK, cache_type="none")
        except FileNotFoundError:
            raise _missing(where, fix, listed_in) from None
        with file:
            if file.size != size:
                raise _short(where, file.size, size, fix, listed_in)
            with self._io(name, "reading"):
                yield file

    def fetch(self, name: str, size: int, sha256: str, fix: str, listed_in: str) -> mmap.mmap:
        """Stream the object into an unlinked temp file, hashing and counting its bytes as they arrive, and map it."""
        where = self.where(name)
        with self.open(name, size, fix, listed_in) as source, tempfile.TemporaryFile(prefix="hookmix-shard-") as copy:
            digest = _stream(source, copy)
            if copy.tell() != size:  # the object changed after its size was read
                raise _short(where, copy.tell(), size, fix, listed_in)
            _check_digest(where, digest, sha256, fix, listed_in)
            copy.flush()
            return mmap.mmap(copy.fileno(), 0, access=mmap.ACCESS_COPY)

    def prepare(self) -> None:
        """Nothing to create: objects under a prefix need no directory."""

    def lock(self, on_wait: Callable[[str], None] | None = None) -> contextlib.AbstractContextManager[None]:
        """No lock: object stores have none; :meth:`write` and :meth:`publish` never replace other bytes."""
        return contextlib.nullcontext()

    def active(self) -> bool:
        return False


def _stream(source: IO[bytes], copy: IO[bytes] | None) -> str:
    """Read ``source`` to its end in :data:`CHUNK` pieces (into ``copy`` when given); its sha256."""
    digest = hashlib.sha256()
    while chunk := source.read(CHUNK):
        digest.update(chunk)
        if copy is not None:
            copy.write(chunk)
    return digest.hexdigest()


def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 200 characters."""
    text = " ".join(str(exc).split()) or "no message"
    text = text if len(text) <= 200 else text[:200] + " ..."
    return f"{type(exc).__name__}: {text}"


def _advice(exc: BaseException) -> str:
    if isinstance(exc, PermissionError):
        return (
            "the store refused the credentials: check them (for s3://: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE) and the bucket's permissions"
        )
    if isinstance(exc, FileNotFoundError):
        return "check that the bucket exists and the URL is right"
    if type(exc).__name__ == "FileExpired":  # s3fs: the object's ETag changed between two reads of it
        return (
            "the object was replaced while it was read: hookmix never replaces a published object, so another "
            "program writes under this prefix; let it finish, or give the cache a prefix of its own"
        )
    return (
        "check that the store answers (for s3://: AWS_ENDPOINT_URL_S3, the network) and run the command again; "
        "a published cache stays valid and an interrupted extraction resumes"
    )


def open_store(location: str | Path | Store) -> Store:
    """The :class:`Store` of ``location``: a ``Store`` as is, a URL (``s3://bucket/prefix``) in object storage,
    ``file://`` or a path on the local file system."""
    if isinstance(location, Store):
        return location
    return RemoteStore(str(location)) if is_remote(location) else LocalStore(local_path(location))
