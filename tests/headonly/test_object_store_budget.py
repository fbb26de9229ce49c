"""``memory_budget`` for a feature cache in object storage, seen from outside the library: the shard copies alive on
the local disk at once (files under the temp directory that this process maps or holds open, unlinked ones
included: ``/proc/self/maps``, ``/proc/self/fd``), sampled every millisecond by a thread while the cache is read.
(The S3 server's own byte counter, ``/proc/<pid>/io``, does not count socket sends: it was tried and read ~0.)

The cache: 8 shards of 1 MiB (512 rows x 1024 float16 features) in moto's S3 server (see conftest.py).

Bugs these tests catch, and where:

* the budget ignored for a remote cache, so that ``mmap=None`` downloads every shard at load although the cache
  exceeds the budget (or streams one that fits) ->
  ``test_a_budget_below_the_cache_streams_it_from_s3_and_one_above_loads_it`` (no shard copied at load);
* a streamed epoch whose read-ahead is not bounded (every shard of the epoch fetched ahead, or a block's temp copies
  kept after its rows were used) -> the same test (copies alive at once <= two blocks, none after the epoch);
* a full load from S3 that fetches every shard ahead into temp files before copying them -> the same test (at most
  three shards on the local disk at once).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from hookmix.headonly.cache import CacheKey, FeatureCache
from hookmix.headonly.training import FitConfig, fit

KEY = CacheKey("test:wide", "input", (1024,), "none", "rows:4096")
SHARDS, ROWS_PER_SHARD, WIDTH = 8, 512, 1024
MiB = 2**20


def wide_cache() -> FeatureCache:
    """4096 rows of 1024 float16 features (8 MiB) and 3 classes."""
    generator = torch.Generator().manual_seed(0)
    rows = SHARDS * ROWS_PER_SHARD
    features = torch.randn(1, rows, WIDTH, generator=generator).half()
    return FeatureCache(features, torch.randint(0, 3, (rows,), generator=generator), KEY)


def local_copies(directory: str) -> set[str]:
    """The files under ``directory`` that this process maps or holds open now (unlinked ones included)."""
    found = {line.split(maxsplit=5)[-1].rstrip("\n") for line in open("/proc/self/maps") if directory in line}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith(directory):
            found.add(target)
    return found


@contextmanager
def most_copies_alive(directory: str) -> Iterator[Callable[[], int]]:
    """Sample :func:`local_copies` every millisecond during the block; yields a function giving the most seen."""
    most, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            most[0] = max(most[0], len(local_copies(directory)))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: most[0]
    finally:
        done.set()
        thread.join()


def test_a_budget_below_the_cache_streams_it_from_s3_and_one_above_loads_it(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, scratch = f"s3://{s3_bucket}/wide", tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the shards' local copies go
    cache = wide_cache()
    cache.save(url, shard_size=ROWS_PER_SHARD)

    with most_copies_alive(str(scratch)) as most:
        streamed = FeatureCache.load(url, KEY, mmap=None, memory_budget=3 * MiB)  # 8 MiB of shards > 3 MiB
    assert most() == 0  # only headers and labels were read: no shard's features came down

    config = FitConfig(epochs=2, batch_size=256, lr=0.01, mix=False)
    with most_copies_alive(str(scratch)) as most:
        blocks = streamed.features.layout(2)  # 2 shards (2 MiB) per block
        fit(nn.Linear(WIDTH, 3), "input", streamed.features, streamed.labels, cache.features[0, :64].float(),
            cache.labels[:64], config, num_classes=3, blocks=blocks, progress=False)  # fmt: skip
    assert 1 <= most() <= 4  # streamed: this block's 2 shards and the next block's 2, never the 8
    assert not local_copies(str(scratch))  # every copy dropped with its block

    with most_copies_alive(str(scratch)) as most:
        loaded = FeatureCache.load(url, KEY, mmap=None, memory_budget=16 * MiB)  # the cache fits: loaded
    assert torch.equal(loaded.features, cache.features) and not local_copies(str(scratch))
    assert 1 <= most() <= 3  # two shards in flight and one being copied out, not all 8 ahead
