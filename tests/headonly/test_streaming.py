"""Streaming a memory-mapped cache (hookmix.headonly.streaming), checked from the outside: which rows reach the head
and in which order, and which shard files are mapped in the process (``/proc/self/maps``) while an epoch runs.

Each row's feature is its own index, so the order a head sees is read off its inputs.

Bugs a maintainer could plausibly make here, and the test that catches each:

* shards no longer permuted, or a block's rows left in shard order (``BlockLayout.order`` drawing one
  permutation instead of ``1 + blocks``), or the same order every epoch / for every seed (a generator
  re-seeded per epoch, or one not passed down):
  ``test_fit_streams_whole_shards_in_blocks_shuffled_across_epochs_and_seeds``;
* ``fit`` ignoring the default layout of a streamed cache (``blocks=None``), or the default size taken from
  the smallest shard, the first one, or not at least one shard:
  ``test_fit_streams_whole_shards_in_blocks_shuffled_across_epochs_and_seeds`` and
  ``test_the_default_block_holds_as_many_of_the_largest_shards_as_fit_in_block_bytes``;
* a block never unmapped (the ``del`` of its shards dropped), a prefetch that reads more than one block
  ahead (or none), or ``close()`` leaving the last block mapped:
  ``test_at_most_two_blocks_are_mapped_at_once_and_none_after_the_epoch``;
* a released block kept mapped through another reference (the readers' futures, which hold the mappings they
  returned) while the block after next is read, three blocks at once:
  ``test_a_released_block_is_unmapped_before_the_block_after_next_is_read``;
* the memory budget above which ``mmap=None`` streams misread (``MemTotal`` or ``MemFree`` for
  ``MemAvailable``, kB taken as bytes, not halved, no fallback without ``/proc``):
  ``test_the_default_memory_budget_is_half_of_the_available_memory``;
* a row read from another view (``- view * n`` for ``+``: equal with two views, where negative indices
  wrap), a half-precision cache returned as float32, or a batch wider than two blocks stalling the reader:
  ``test_batches_of_a_three_view_float16_cache_equal_the_in_memory_rows``;
* gathering on a device (the CPU stands in for a GPU): a shard's offset in its block's tensor counted in rows
  instead of rows x views, a block's span taken from the wrong end (the first block's start read as the last
  block's end), a batch that spans blocks gathered from one:
  ``test_batches_of_a_three_view_float16_cache_equal_the_in_memory_rows[device-gather]``;
* a shard staged in chunks that land at the wrong rows of its block, or the last, shorter chunk dropped:
  ``test_batches_of_a_three_view_float16_cache_equal_the_in_memory_rows[device-gather]``;
* a shard's mapping kept after it was copied into its block (host memory held twice):
  ``test_a_device_gather_unmaps_each_shard_once_its_block_is_copied``;
* the readers' results not awaited before a block is used (a bad checksum never raised, rows read from a
  tensor not yet filled): ``test_a_device_gather_refuses_a_corrupted_shard_before_its_rows_are_used``.
"""

from __future__ import annotations

import io
import os
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from hookmix.headonly import streaming
from hookmix.headonly.cache import CacheKey, FeatureCache
from hookmix.headonly.streaming import BLOCK_BYTES, BlockLayout, ShardedFeatures
from hookmix.headonly.training import FitConfig, fit

N, SHARD = 38, 5  # 8 shards: seven of 5 rows and a last one of 3 (a smaller file)
KEY = CacheKey(model="test:identity", layer="flat", input_size=(1, 2, 2), transform="none")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An on-disk float32 cache whose row ``i`` holds the feature ``(i, i, i, i)``."""
    path = tmp_path_factory.mktemp("stream")
    rows = torch.arange(N, dtype=torch.float32)
    dataset = TensorDataset(rows[:, None, None, None].expand(N, 1, 2, 2).clone(), torch.arange(N) % 3)
    options = dict(path=path, dtype=torch.float32, batch_size=8, shard_size=SHARD, progress=False)
    FeatureCache.extract(nn.Flatten(), dataset, KEY, **options)
    return path


def streamed(cache_dir: Path) -> FeatureCache:
    cache = FeatureCache.load(cache_dir, KEY, mmap=True)
    assert isinstance(cache.features, ShardedFeatures) and cache.features.stops == (*range(5, N, SHARD), N)
    return cache


def shard_sizes(cache_dir: Path) -> list[int]:
    return [p.stat().st_size for p in sorted(cache_dir.glob("shard-*.safetensors"))]


def fitted_order(cache: FeatureCache, seed: int, epochs: int = 3) -> list[list[int]]:
    """The rows a head receives in each training epoch of an unmixed streamed ``fit`` (default layout)."""
    seen: list[torch.Tensor] = []
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    head.register_forward_pre_hook(lambda m, a: seen.append(a[0][:, 0].long()) if torch.is_grad_enabled() else None)
    config = FitConfig(epochs=epochs, batch_size=8, seed=seed, mix=False)
    fit(
        head,
        "input",
        cache.features,
        cache.labels,
        torch.zeros(2, 4),
        torch.tensor([0, 1]),
        config,
        num_classes=3,
        progress=False,
    )
    rows = torch.cat(seen).tolist()
    assert len(rows) == epochs * N
    return [rows[e * N : (e + 1) * N] for e in range(epochs)]


def blocks_of(rows: list[int], per_block: int) -> list[tuple[frozenset[int], list[int]]]:
    """Cut an epoch's rows into its blocks: runs that hold all the rows of ``per_block`` whole shards
    (fewer for the last block), each shard's rows in one run. Fails when the rows are not so grouped."""
    size = [min(SHARD, N - s * SHARD) for s in range((N + SHARD - 1) // SHARD)]
    blocks, shards, run = [], set(), []
    for row in rows:
        shards.add(row // SHARD)
        run.append(row)
        assert len(shards) <= per_block, f"a block holds rows of more than {per_block} shards: {sorted(shards)}"
        last = len(blocks) * per_block + len(shards) == len(size)
        if len(run) == sum(size[s] for s in shards) and (len(shards) == per_block or last):
            blocks.append((frozenset(shards), run))
            shards, run = set(), []
    assert not run and sorted(rows) == list(range(N)), "an epoch must visit every row once, in whole blocks"
    return blocks


def test_fit_streams_whole_shards_in_blocks_shuffled_across_epochs_and_seeds(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``blocks=None`` a streamed fit takes the cache's default layout: here two of the largest shards
    fit in ``BLOCK_BYTES``, so every block is two whole shards. The shards are permuted across blocks, the
    rows of a block are interleaved, and both change from epoch to epoch and from seed to seed."""
    monkeypatch.setattr(streaming, "BLOCK_BYTES", 2 * max(shard_sizes(cache_dir)) + 1)
    cache = streamed(cache_dir)
    orders = {seed: fitted_order(cache, seed) for seed in (0, 1)}
    assert fitted_order(cache, 0) == orders[0]  # reproducible
    epochs = [blocks_of(rows, per_block=2) for order in orders.values() for rows in order]
    assert all(len(blocks) == 4 for blocks in epochs)
    partitions = {tuple(shards for shards, _ in blocks) for blocks in epochs}
    assert len(partitions) == len(epochs)  # 6 epochs, 6 different shard orders (2,520 possible)
    runs = [run for blocks in epochs for _, run in blocks]
    assert not any(run == sorted(run) for run in runs)  # the rows of a block are shuffled...
    interleaved = [sum(a // SHARD != b // SHARD for a, b in zip(run, run[1:])) > 1 for run in runs]
    assert sum(interleaved) > len(runs) // 2  # ...among themselves, not shard after shard
    assert orders[0][0] != orders[1][0] and orders[0][1] != orders[0][2]


def test_the_default_block_holds_as_many_of_the_largest_shards_as_fit_in_block_bytes(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """512 MiB by default (two blocks resident: about 1 GiB); shard sizes read from the files on disk."""
    sizes = shard_sizes(cache_dir)
    largest = max(sizes)
    assert min(sizes) < largest  # the last shard is smaller: the largest one sets the block size
    features = streamed(cache_dir).features
    assert BLOCK_BYTES == 512 * 2**20 and features.layout().shards_per_block == 512 * 2**20 // largest
    for budget, expected in [(2 * largest, 2), (2 * largest - 1, 1), (largest - 1, 1), (3 * largest, 3)]:
        monkeypatch.setattr(streaming, "BLOCK_BYTES", budget)
        assert features.layout().shards_per_block == expected, budget
    assert features.layout(5).shards_per_block == 5  # an explicit size wins
    assert repr(features) == f"ShardedFeatures(shape=(1, {N}, 4), dtype=torch.float32, shards=8, path={cache_dir})"


def mapped_shards(directory: Path) -> set[str]:
    """The shard files of ``directory`` that this process has mapped now."""
    with open("/proc/self/maps") as maps:
        return {Path(line.split()[-1]).name for line in maps if str(directory) in line and "shard-" in line}


def settled(directory: Path, expected: set[str], timeout: float = 2.0) -> set[str]:
    """The mapped shards once they equal ``expected`` (the reader threads map the next block in the
    background), or after ``timeout`` seconds; then 20 ms more, so that an extra block read too early shows."""
    deadline = time.monotonic() + timeout
    while mapped_shards(directory) != expected and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.02)
    return mapped_shards(directory)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the mappings from /proc/self/maps")
@pytest.mark.parametrize("per_block, batch_size", [(1, 4), (2, 3), (3, 7)])
def test_at_most_two_blocks_are_mapped_at_once_and_none_after_the_epoch(
    cache_dir: Path, per_block: int, batch_size: int
) -> None:
    """While a batch is used, exactly these shard files are mapped: those of the blocks its rows come from,
    and the next block (read ahead) when the batch lies in one block — never more than two blocks; once the
    epoch ends, or is closed early, nothing stays mapped."""
    features = streamed(cache_dir).features
    plan = features.layout(per_block).order(torch.Generator().manual_seed(per_block))
    names = [{f"shard-{s:05d}.safetensors" for s in block} for block in plan.blocks]
    block_of_row = {r: b for b, block in enumerate(plan.blocks) for s in block for r in range(s * SHARD, N)[:SHARD]}
    view, straddled, got = torch.zeros(N, dtype=torch.long), 0, []
    for begin, batch in zip(range(0, N, batch_size), features.batches(plan, view, batch_size)):
        touched = sorted({block_of_row[int(r)] for r in plan.order[begin : begin + batch_size]})
        ahead = [touched[-1] + 1] if len(touched) == 1 and touched[-1] + 1 < len(names) else []
        expected = set().union(*(names[b] for b in touched + ahead))
        assert settled(cache_dir, expected) == expected and len(touched + ahead) <= 2
        straddled += len(touched) == 2
        got.append(batch[:, 0])
    assert torch.equal(torch.cat(got), plan.order.float())
    assert straddled and mapped_shards(cache_dir) == set()
    early = features.batches(plan, view, batch_size)
    next(early)
    assert mapped_shards(cache_dir)
    early.close()
    assert mapped_shards(cache_dir) == set()


class InlinePool:
    """A ``ThreadPoolExecutor`` stand-in that runs each read at once, in the calling thread: the next block is
    then mapped at the very moment the stream asks for it, so what is still mapped at that moment shows."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __enter__(self) -> InlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def submit(self, fn, *args):  # noqa: ANN001, ANN201
        done: Future = Future()
        done.set_result(fn(*args))
        return done


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the mappings from /proc/self/maps")
def test_a_released_block_is_unmapped_before_the_block_after_next_is_read(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Releasing block k queues block k+2 while block k+1 waits: a reference to block k kept anywhere (the
    readers' futures, which hold the mappings they returned) would make three blocks mapped at that moment.
    Counted each time a shard is mapped, with the reads run in line so that moment is not left to the threads, and
    batches that end where blocks end (block k is released right after its last batch, before k+1 is used)."""
    monkeypatch.setattr(streaming, "ThreadPoolExecutor", InlinePool)
    features = streamed(cache_dir).features
    plan = features.layout(2).order(torch.Generator().manual_seed(0))
    original, most = ShardedFeatures._map_shard, [0]

    def counted(self: ShardedFeatures, index: int) -> torch.Tensor:
        mapped = original(self, index)
        most[0] = max(most[0], len(mapped_shards(cache_dir)))
        return mapped

    monkeypatch.setattr(ShardedFeatures, "_map_shard", counted)
    rows = torch.cat(list(features.batches(plan, torch.zeros(N, dtype=torch.long), 5)))
    assert torch.equal(rows[:, 0], plan.order.float())
    assert most[0] == 4  # two blocks of two shards, never a third block


@pytest.mark.parametrize(
    "meminfo, expected",
    [
        ("MemTotal:       16000 kB\nMemFree:     3000 kB\nMemAvailable:    8000 kB\n", 8000 * 1024 // 2),
        ("MemTotal:       16000 kB\nMemFree:     3000 kB\n", 300 * 4096 // 2),  # an old kernel: free pages
        (None, 300 * 4096 // 2),  # no /proc (macOS): free pages
    ],
    ids=["MemAvailable", "no_MemAvailable", "no_proc"],
)
def test_the_default_memory_budget_is_half_of_the_available_memory(
    monkeypatch: pytest.MonkeyPatch, meminfo: str | None, expected: int
) -> None:
    def fake_open(path: str) -> io.StringIO:
        assert path == "/proc/meminfo"
        if meminfo is None:
            raise FileNotFoundError(path)
        return io.StringIO(meminfo)

    pages = {"SC_AVPHYS_PAGES": 300, "SC_PAGE_SIZE": 4096}
    monkeypatch.setattr(streaming, "open", fake_open, raising=False)
    monkeypatch.setattr(os, "sysconf", pages.__getitem__)
    budget = streaming.default_memory_budget()
    assert budget == expected and isinstance(budget, int)


class NoisyRows(TensorDataset):
    """Row ``i`` plus noise from the dataset's own generator: every extraction pass (view) differs."""

    def __init__(self) -> None:
        super().__init__(torch.arange(N, dtype=torch.float32)[:, None, None, None].expand(N, 1, 2, 2).clone())
        self.gen = torch.Generator().manual_seed(0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        (x,) = super().__getitem__(index)
        return x + torch.rand(x.shape, generator=self.gen), torch.tensor(index % 3)


@pytest.mark.parametrize("device", [None, "cpu"], ids=["host-gather", "device-gather"])
def test_batches_of_a_three_view_float16_cache_equal_the_in_memory_rows(
    tmp_path: Path, device: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row from its own view, in float16, including batches that span more than two blocks; gathered on
    the host from the mapped shards, or on a device (the CPU here) from whole blocks copied there through staging
    buffers of 2 rows (a shard's 15 rows, 3 views x 5, in 8 copies)."""
    monkeypatch.setattr(streaming, "STAGING_BYTES", 2 * 4 * 2 + 3)
    options = dict(path=tmp_path, dtype=torch.float16, batch_size=8, shard_size=SHARD, views=3, progress=False)
    FeatureCache.extract(nn.Flatten(), NoisyRows(), KEY, **options)
    memory = FeatureCache.load(tmp_path, KEY).features
    features = FeatureCache.load(tmp_path, KEY, mmap=True).features
    assert memory.shape == (3, N, 4) and not torch.equal(memory[1], memory[2])
    random_views = torch.randint(3, (N,), generator=torch.Generator().manual_seed(1))
    last_view = torch.full((N,), 2)  # every shard's last stored rows, staged last
    for per_block, batch_size, view in [
        (2, 6, random_views),
        (1, 16, random_views),
        (3, 7, last_view),
        (8, 38, last_view),
    ]:
        plan = features.layout(per_block).order(torch.Generator().manual_seed(per_block))  # 16: up to 4 blocks
        batches = list(features.batches(plan, view, batch_size, device))
        assert [len(b) for b in batches] == [min(batch_size, N - i) for i in range(0, N, batch_size)]
        got = torch.cat(batches)
        assert got.dtype == torch.float16
        assert torch.equal(got, memory[view[plan.order], plan.order])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the mappings from /proc/self/maps")
def test_a_device_gather_unmaps_each_shard_once_its_block_is_copied(cache_dir: Path) -> None:
    """Gathering on a device, a shard's file is mapped only while it is checksummed and copied into its block:
    between batches (once the reader threads are done) and after the epoch, nothing is mapped."""
    features = streamed(cache_dir).features
    plan = features.layout(2).order(torch.Generator().manual_seed(0))
    got = []
    for batch in features.batches(plan, torch.zeros(N, dtype=torch.long), 4, "cpu"):
        assert settled(cache_dir, set()) == set()
        got.append(batch[:, 0])
    assert torch.equal(torch.cat(got), plan.order.float()) and mapped_shards(cache_dir) == set()
    with pytest.raises(ValueError, match="device='meta': rows are gathered on the host"):
        next(features.batches(plan, torch.zeros(N, dtype=torch.long), 4, "meta"))


def test_a_device_gather_refuses_a_corrupted_shard_before_its_rows_are_used(cache_dir: Path, tmp_path: Path) -> None:
    """The checksum is verified as the shard is copied to the device, and the error raised when its block is
    needed: every batch before it was whole and right, none holds a row of the damaged shard."""
    for path in cache_dir.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    features = streamed(tmp_path).features
    plan = features.layout(1).order(torch.Generator().manual_seed(2))
    damaged = plan.blocks[4][0]  # the fifth block to be read
    path = tmp_path / f"shard-{damaged:05d}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last feature byte: same size, valid header, another checksum
    path.write_bytes(bytes(data))
    got = []
    with pytest.raises(ValueError, match=f"shard-{damaged:05d}.safetensors fails its checksum"):
        for batch in features.batches(plan, torch.zeros(N, dtype=torch.long), 2, "cpu"):
            got.append(batch[:, 0])
    used = torch.cat(got).long()
    before = sum(min(SHARD, N - s * SHARD) for block in plan.blocks[:4] for s in block)  # rows of the first 4 blocks
    assert torch.equal(used, plan.order[: len(used)]) and len(used) == before - before % 2
    assert not (used // SHARD == damaged).any()


@pytest.mark.parametrize(
    "stops", [50, "16,32", (), [], (0, 5), (5, 5), (8, 3), (4, 2.5), (4, True, 9), (-1, 4)], ids=repr
)
def test_a_layout_refuses_stops_that_are_not_increasing_positive_integers(stops) -> None:
    with pytest.raises(ValueError, match=r"stops=.* must be increasing positive shard ends"):
        BlockLayout(stops, 1)


def test_a_layout_takes_a_list_of_stops_and_refuses_an_empty_block() -> None:
    assert BlockLayout([5, 10], 2).stops == (5, 10) and BlockLayout((1, 2), 1).rows == 2
    with pytest.raises(ValueError, match="shards_per_block"):
        BlockLayout((5, 10), 0)
