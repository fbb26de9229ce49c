"""Feature caches in object storage (issue 24, item 2), against a real S3 API served locally (moto's server in a
subprocess, see conftest.py): every request goes over HTTP through s3fs as it would to AWS.

Bugs these tests catch, and where:

* remote objects named, laid out or encoded otherwise than the local files, or read back in another order ->
  ``test_a_cache_in_s3_holds_the_local_files_and_reads_back_equal_in_memory_and_streamed``;
* the manifest written before the last shard (a half-written cache readable as complete), or a crash that leaves a
  ``manifest.json``; a resume that re-extracts everything or loses the stored rows ->
  ``test_an_interrupted_extraction_publishes_no_manifest_and_resumes_where_it_stopped``;
* a plain overwrite where a write should happen once (another writer's shard replaced by other bytes, a published
  manifest rewritten) -> ``test_a_shard_or_manifest_already_in_the_store_is_never_replaced``;
* the sha256 not checked on the bytes that arrive, the size not compared, or an error without the object's URL ->
  ``test_a_missing_truncated_or_changed_object_is_refused_in_one_line_naming_it``;
* a storage-library exception (botocore, aiohttp) escaping as a traceback, or a failed write that publishes ->
  ``test_refused_credentials_are_one_line_naming_the_object_and_publish_nothing``,
  ``test_the_server_going_away_mid_epoch_ends_in_one_line_naming_the_shard``;
* a pass of several targets (``extract_many``, what a sweep runs) taking a URL for a ``Path`` (``s3:/bucket`` on the
  local disk), or comparing the targets' locations as given, so that two spellings of one prefix (``.../x`` and
  ``.../x/``) write into it together ->
  ``test_one_pass_fills_a_cache_in_s3_and_one_on_disk_and_two_targets_may_not_share_a_prefix``;
* a sharded extraction over ranks writing a URL through local paths, refusing to redo a damaged shard in the
  store, or publishing before every rank's shards are in: ``tests/headonly/test_distributed.py``'s
  ``test_two_ranks_extract_into_s3_the_bytes_one_process_writes_and_redo_only_missing_or_damaged_shards``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from hookmix.core.errors import UsageError
from hookmix.headonly.cache import CacheKey, FeatureCache
from hookmix.headonly.store import RemoteStore, StoreError, open_store
from hookmix.headonly.streaming import ShardedFeatures

KEY = CacheKey("test:linear", "input", (6,), "none", "rows:40")
ROWS, SHARD = 40, 8


def small_cache() -> FeatureCache:
    """40 rows of (1, 40, 6) float16 features and int64 labels: five shards of 8 rows."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, ROWS, 6, generator=generator).half()
    return FeatureCache(features, torch.randint(0, 3, (ROWS,), generator=generator), KEY)


def objects(url: str) -> dict[str, bytes]:
    """Every object under ``url``, by name."""
    store = open_store(url)
    assert isinstance(store, RemoteStore)
    return {path.rsplit("/", 1)[-1]: store.fs.cat_file(path) for path in store.fs.find(store._root)}


def one_line(error: BaseException, failed_request: bool = True) -> str:
    """The message of ``error``: one line; a failed request is a StoreError (a UsageError and an OSError)."""
    text = str(error)
    assert "\n" not in text and isinstance(error, UsageError), text
    assert not failed_request or (isinstance(error, StoreError) and isinstance(error, OSError)), text
    return text


def test_a_cache_in_s3_holds_the_local_files_and_reads_back_equal_in_memory_and_streamed(
    tmp_path: Path, s3_bucket: str
) -> None:
    cache, url = small_cache(), f"s3://{s3_bucket}/caches/train"
    cache.save(tmp_path / "train", shard_size=SHARD)
    saved = cache.save(url, shard_size=SHARD)
    assert saved.path == url
    stored = objects(url)
    local = {p.name: p.read_bytes() for p in (tmp_path / "train").iterdir() if not p.name.startswith(".")}
    assert sorted(stored) == sorted(local) == ["manifest.json", *(f"shard-{i:05d}.safetensors" for i in range(5))]
    for name in local:
        if name != "manifest.json":
            assert stored[name] == local[name], name
    ours, theirs = json.loads(stored["manifest.json"]), json.loads(local["manifest.json"])
    assert {**ours, "created": None} == {**theirs, "created": None}

    loaded = FeatureCache.load(url, KEY)
    assert torch.equal(loaded.features, cache.features) and torch.equal(loaded.labels, cache.labels)
    streamed, on_disk = FeatureCache.load(url, KEY, mmap=True), FeatureCache.load(tmp_path / "train", KEY, mmap=True)
    assert isinstance(streamed.features, ShardedFeatures) and torch.equal(streamed.labels, cache.labels)
    layout = streamed.features.layout(2)
    order = layout.order(torch.Generator().manual_seed(3))
    view = torch.zeros(ROWS, dtype=torch.long)
    remote_batches = list(streamed.features.batches(order, view, 7))
    local_batches = list(on_disk.features.batches(order, view, 7))
    assert len(remote_batches) == 6 and all(torch.equal(a, b) for a, b in zip(remote_batches, local_batches))
    assert torch.equal(torch.cat(remote_batches), cache.features[0, order.order])


class Rows(Dataset):
    """``(x (6,), y)`` rows of :func:`small_cache`'s shapes; with ``fail_at``, reading that row raises once, as a
    crash mid-extraction would."""

    def __init__(self, fail_at: int | None = None) -> None:
        generator = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(ROWS, 6, generator=generator), torch.arange(ROWS) % 3
        self.fail_at = fail_at

    def __len__(self) -> int:
        return ROWS

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index == self.fail_at:
            raise RuntimeError(f"the process died at row {index}")
        return self.x[index], self.y[index]


def extract(dataset: Dataset, path: str | Path) -> FeatureCache:
    return FeatureCache.extract(nn.Identity(), dataset, KEY, path=path, batch_size=4, shard_size=SHARD, progress=False)


def test_an_interrupted_extraction_publishes_no_manifest_and_resumes_where_it_stopped(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{s3_bucket}/caches/rows"
    published_at_write: list[bool] = []
    write = RemoteStore.write

    def write_watched(self: RemoteStore, name: str, data: bytes, *, replace: bool = False) -> None:
        published_at_write.append(self.fs.exists(f"{self._root}/manifest.json"))
        write(self, name, data, replace=replace)

    monkeypatch.setattr(RemoteStore, "write", write_watched)
    with pytest.raises(RuntimeError, match="died at row 21"):
        extract(Rows(fail_at=21), url)
    assert "manifest.json" not in objects(url)
    progress = json.loads(objects(url)["manifest.json.partial"])
    assert [shard["stop"] for shard in progress["shards"]] == [8, 16]
    with pytest.raises(UsageError, match="incomplete .16 of 40 examples; its extraction was interrupted"):
        FeatureCache.load(url, KEY)

    resumed = extract(Rows(), url)
    assert resumed.rows_reused == 16 and resumed.batches_run == 6  # rows 16..39 only, 4 per batch
    assert published_at_write == [False] * 5  # every shard was written before the manifest was published
    assert sorted(objects(url)) == ["manifest.json", *(f"shard-{i:05d}.safetensors" for i in range(5))]
    local = extract(Rows(), tmp_path / "rows")
    assert torch.equal(resumed.features, local.features) and torch.equal(resumed.labels, local.labels)


def test_a_shard_or_manifest_already_in_the_store_is_never_replaced(s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/caches/train"
    small_cache().save(url, shard_size=SHARD)
    before = objects(url)
    store = open_store(url)
    store.write("shard-00001.safetensors", before["shard-00001.safetensors"])  # the same bytes: a twin writer
    with pytest.raises(StoreError, match="shard-00001.safetensors already exists with other bytes") as info:
        store.write("shard-00001.safetensors", b"other bytes")
    assert f"s3://{s3_bucket}/caches/train/shard-00001.safetensors" in one_line(info.value)
    store.publish("manifest.json", b"{}", complete=True)  # a second writer's publish finds the first one's
    assert objects(url) == before


def damage(kind: str, url: str) -> None:
    """Remove, truncate or change (same size, one byte) shard 2 under ``url``."""
    store = open_store(url)
    assert isinstance(store, RemoteStore)
    path = f"{store._root}/shard-00002.safetensors"
    data = bytearray(store.fs.cat_file(path))
    store.fs.rm_file(path)
    if kind == "truncated":
        store.fs.pipe_file(path, bytes(data[: len(data) // 2]))
    elif kind == "changed":
        data[-1] ^= 0xFF
        store.fs.pipe_file(path, bytes(data))


@pytest.mark.parametrize(
    "kind, expected", [("missing", "is missing"), ("truncated", "truncated"), ("changed", "fails its checksum")]
)
@pytest.mark.parametrize("mmap", [False, True])
def test_a_missing_truncated_or_changed_object_is_refused_in_one_line_naming_it(
    s3_bucket: str, kind: str, expected: str, mmap: bool
) -> None:
    url = f"s3://{s3_bucket}/caches/train"
    small_cache().save(url, shard_size=SHARD)
    damage(kind, url)
    with pytest.raises(UsageError) as info:
        cache = FeatureCache.load(url, KEY, mmap=mmap)  # missing and truncated: refused here, mapped or not
        if isinstance(cache.features, ShardedFeatures):  # changed: refused when its block is read
            order = cache.features.layout(1).order(torch.Generator().manual_seed(0))
            list(cache.features.batches(order, torch.zeros(ROWS, dtype=torch.long), SHARD))
    message = one_line(info.value, failed_request=False)  # damage: the words of a damaged local shard
    assert f"shard s3://{s3_bucket}/caches/train/shard-00002.safetensors " in message and expected in message


def test_refused_credentials_are_one_line_naming_the_object_and_publish_nothing(
    s3_env, s3_bucket: str, s3_auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{s3_bucket}/caches/train"
    small_cache().save(url, shard_size=SHARD)
    s3_auth()  # from now on the environment's keys are refused
    with pytest.raises(StoreError) as info:
        FeatureCache.load(url, KEY)
    message = one_line(info.value)
    assert f" {url}/manifest.json failed: PermissionError" in message and "AWS_ACCESS_KEY_ID" in message

    s3_env.post("/moto-api/reset-auth", b"inf")
    write, written = RemoteStore.write, []

    def refuse_after_two(self: RemoteStore, name: str, data: bytes, *, replace: bool = False) -> None:
        if len(written) == 2:
            s3_auth()
        written.append(name)
        write(self, name, data, replace=replace)

    monkeypatch.setattr(RemoteStore, "write", refuse_after_two)
    other = f"s3://{s3_bucket}/caches/other"
    with pytest.raises(StoreError, match=f"writing {other}/shard-00002.safetensors failed: PermissionError"):
        small_cache().save(other, shard_size=SHARD)
    s3_env.post("/moto-api/reset-auth", b"inf")
    assert sorted(objects(other)) == ["manifest.json.partial", "shard-00000.safetensors", "shard-00001.safetensors"]


def test_the_server_going_away_mid_epoch_ends_in_one_line_naming_the_shard(private_s3) -> None:
    url = "s3://hookmix/caches/train"
    cache = FeatureCache.load(small_cache().save(url, shard_size=SHARD).path, KEY, mmap=True)
    order = cache.features.layout(1).order(torch.Generator().manual_seed(0))
    batches = cache.features.batches(order, torch.zeros(ROWS, dtype=torch.long), SHARD)
    first = next(batches)
    private_s3.kill()
    with pytest.raises(StoreError) as info:
        list(batches)
    message = one_line(info.value)
    shards = {f"{url}/shard-{i:05d}.safetensors" for block in order.blocks[1:] for i in block}
    assert message.startswith("reading ") and message.split()[1] in shards, message
    assert "check that the store answers" in message and first.shape == (SHARD, 6)


class Doubled(nn.Module):
    """Two outputs of one pass: the rows as they are (``"same"``) and doubled (``"doubled"``, exact in float16)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"same": x, "doubled": 2 * x}


def test_one_pass_fills_a_cache_in_s3_and_one_on_disk_and_two_targets_may_not_share_a_prefix(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url, doubled_key = f"s3://{s3_bucket}/caches/many", CacheKey("test:doubled", "input", (6,), "none", "rows:40")
    targets = {"same": (KEY, f"{url}/same"), "doubled": (doubled_key, tmp_path / "doubled")}
    options = dict(batch_size=4, shard_size=SHARD, progress=False)
    caches = FeatureCache.extract_many(lambda names: Doubled(), Rows(), targets, **options)
    reference = extract(Rows(), tmp_path / "reference")
    assert caches["same"].path == f"{url}/same" and caches["same"].batches_run == ROWS // 4
    assert torch.equal(caches["same"].features, reference.features)
    assert torch.equal(caches["doubled"].features, 2 * reference.features)
    shards = {name: data for name, data in objects(f"{url}/same").items() if name.startswith("shard")}
    assert shards == {p.name: p.read_bytes() for p in (tmp_path / "reference").glob("shard-*")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doubled", "reference"]  # no folder named after the URL

    def no_backbone(names: tuple[str, ...]) -> nn.Module:
        raise AssertionError(f"both caches are stored, yet the backbone was asked for {names}")

    again = FeatureCache.extract_many(no_backbone, Rows(), targets, **options)
    assert all(cache.reused and cache.batches_run == 0 for cache in again.values())
    with pytest.raises(UsageError, match="two targets share a cache directory"):
        shared = {"same": (KEY, f"{url}/x"), "doubled": (KEY, f"{url}/x/")}
        FeatureCache.extract_many(lambda names: Doubled(), Rows(), shared, **options)
