"""Two processes writing one feature cache directory at the same time (issue 20, item 6).

Process A extracts slowly; once its first shard is published it lets process B start its own
``FeatureCache.extract`` into the same directory, waits half a second (B is then inside ``extract``), and
goes on. Bugs these tests catch:

* no lock, so B resumes A's half-written cache and both write shards (B's bytes differ, as another batch
  size or machine makes them): B loads a mix of both writers, or one process is told its valid cache "fails
  its checksum" -> ``test_a_second_writer_of_the_same_key_waits_and_loads_the_first_ones_cache``;
* a refusal that advises deleting the directory while another process's valid cache is in it (the old
  "delete DIR and extract again") -> ``test_a_writer_of_another_dtype_is_refused_without_advice_to_delete``.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from hookmix.headonly.cache import MANIFEST_NAME, FeatureCache
from tests.headonly.test_cache import KEY, assert_safe_advice, make_backbone, make_dataset, reference

ROWS = 48
SHARD = 8
WAIT = 60.0
"""Seconds a process waits for the other one's signal before the test gives up."""

pytestmark = pytest.mark.slow


class Shifted(nn.Module):
    """The test backbone plus ``offset``: other bytes for the same key, as another batch size or machine gives."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.body, self.offset = make_backbone(), offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.offset


class HandOver(Dataset):
    """Rows of ``make_dataset(ROWS)``. Reading row ``SHARD`` (shard 0 is published by then) sets ``published``,
    waits until the other process is about to extract, then half a second more; every row takes ``delay``."""

    def __init__(self, published: mp.Event, other_ready: mp.Event, delay: float) -> None:
        self.base, self.published, self.other_ready, self.delay = make_dataset(ROWS), published, other_ready, delay

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, index: int):
        if index == SHARD:
            self.published.set()
            assert self.other_ready.wait(WAIT), "the second process never started"
            time.sleep(0.5)
        time.sleep(self.delay)
        return self.base[index]


def _first(path: str, published: mp.Event, other_ready: mp.Event, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    data = HandOver(published, other_ready, delay=0.01)
    _extract(Shifted(0.0), data, path, torch.float32, "A", results)


def _second(path: str, dtype: torch.dtype, other_ready: mp.Event, results: mp.Queue) -> None:
    torch.set_num_threads(1)
    other_ready.set()
    _extract(Shifted(1e-3), make_dataset(ROWS), path, dtype, "B", results)


def _extract(backbone: nn.Module, data: Dataset, path: str, dtype: torch.dtype, name: str, results: mp.Queue) -> None:
    """Extract; report ``(name, features, batches run)`` or ``(name, "Error: message", None)`` to the parent."""
    try:
        cache = FeatureCache.extract(
            backbone, data, KEY, path=path, dtype=dtype, batch_size=SHARD, shard_size=SHARD, progress=False
        )
        results.put((name, cache.features.float().numpy(), cache.batches_run))
    except Exception as exc:  # any failure goes to the parent's assertion, none leaves it waiting
        results.put((name, f"{type(exc).__name__}: {exc}", None))


def _run_both(path: Path, dtype: torch.dtype) -> dict[str, tuple]:
    """Start A, start B once A has published its first shard; both results by process name."""
    context = mp.get_context("fork")  # spawned children re-import torch (~10 s on 2 busy cores); see test_distributed
    published, other_ready, results = context.Event(), context.Event(), context.Queue()
    first = context.Process(target=_first, args=(str(path), published, other_ready, results))
    first.start()
    assert published.wait(WAIT) and (path / MANIFEST_NAME).is_file()
    second = context.Process(target=_second, args=(str(path), dtype, other_ready, results))
    second.start()
    found = {}
    for _ in range(2):
        name, *rest = results.get(timeout=2 * WAIT)
        found[name] = tuple(rest)
    for process in (first, second):
        process.join(WAIT)
        assert process.exitcode == 0
    return found


def test_a_second_writer_of_the_same_key_waits_and_loads_the_first_ones_cache(tmp_path: Path) -> None:
    found = _run_both(tmp_path / "cache", torch.float32)
    expected = reference(make_backbone(), make_dataset(ROWS))
    (first, first_batches), (second, second_batches) = found["A"], found["B"]
    assert not isinstance(first, str) and not isinstance(second, str), (first, second)  # e.g. "fails its checksum"
    assert torch.equal(torch.from_numpy(first[0]), expected) and first_batches == ROWS // SHARD
    assert torch.equal(torch.from_numpy(second[0]), expected) and second_batches == 0  # A's rows, none of B's own
    assert torch.equal(FeatureCache.load(tmp_path / "cache", KEY).features[0], expected)


def test_a_writer_of_another_dtype_is_refused_without_advice_to_delete(tmp_path: Path) -> None:
    found = _run_both(tmp_path / "cache", torch.float16)
    expected = reference(make_backbone(), make_dataset(ROWS))
    first, message = found["A"][0], found["B"][0]
    assert not isinstance(first, str) and torch.equal(torch.from_numpy(first[0]), expected), first
    assert isinstance(message, str) and message.startswith("UsageError: the feature cache in")
    assert "dtype='float32', but dtype='float16' was requested" in message
    assert "extract into another directory" in message
    assert_safe_advice(message)
    assert torch.equal(FeatureCache.load(tmp_path / "cache", KEY).features[0], expected)  # A's cache is intact
