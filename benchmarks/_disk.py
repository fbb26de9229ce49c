"""Disk helpers the cache benchmarks share: cold reads, plain sequential reads, peak resident memory."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

GB = 1e9


def peak_rss() -> float:
    """This process's peak resident set size in GB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def drop_page_cache(directory: Path) -> None:
    """Evict every file under ``directory`` from the page cache (after fsync): the next read is cold."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_shards(directory: Path) -> tuple[float, int]:
    """Read every shard of a hookmix cache once, in order, in 16 MiB chunks: ``(seconds, bytes)`` of the
    plain sequential read a streamed epoch is compared with."""
    buffer = bytearray(16 * 2**20)
    start, total = time.perf_counter(), 0
    for path in sorted(directory.glob("shard-*.safetensors")):
        with open(path, "rb", buffering=0) as file:
            while read := file.readinto(buffer):
                total += read
    return time.perf_counter() - start, total
