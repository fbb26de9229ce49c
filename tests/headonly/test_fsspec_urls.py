"""A feature cache under any fsspec URL, through the library API: fsspec's in-process ``memory://`` file system (no
server), and the one-line refusals of a URL whose storage library is missing or whose scheme fsspec does not know.

Bugs these tests catch, and where:

* code that works for s3:// only (s3fs calls, ``s3://`` spelled out, a bucket assumed in the path) or a URL folded
  into a local path (``memory:/`` on the disk) ->
  ``test_a_cache_under_a_memory_url_holds_the_local_bytes_and_trains_the_local_head`` (objects byte for byte,
  nothing written to the working directory);
* a remote cache read back otherwise than a local one (another order, a lost row, the sha256 not checked) -> the same
  test (loaded and streamed heads equal the local cache's, bitwise; a changed object refused);
* a missing backend or an unknown scheme ending in an ImportError / ValueError traceback, or in a line without the
  fix, or naming the command's ``--cache`` to a Python caller ->
  ``test_a_url_without_its_storage_library_or_with_an_unknown_scheme_is_one_line_naming_the_fix``;
* a write-once conflict that names a flag (``--cache``) instead of the object and the fix in library terms ->
  ``test_a_shard_already_there_with_other_bytes_is_refused_naming_the_object_and_no_flag``.
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from hookmix.core.errors import UsageError
from hookmix.headonly.cache import CacheKey, FeatureCache
from hookmix.headonly.store import StoreError, open_store
from hookmix.headonly.training import FitConfig, fit

KEY = CacheKey("test:linear", "input", (6,), "none", "rows:40")


def rows() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(40, 6, generator=generator), torch.arange(40) % 3)


def extract(path: str | Path) -> FeatureCache:
    return FeatureCache.extract(nn.Identity(), rows(), KEY, path=path, batch_size=4, shard_size=8, progress=False)


def trained_head(cache: FeatureCache) -> list[torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = nn.Linear(6, 3)
    config = FitConfig(epochs=2, batch_size=8, lr=0.1, mix=True, seed=0)
    train = cache.features
    fit(head, "input", train, cache.labels, torch.randn(6, 6), torch.arange(6) % 3, config, num_classes=3,
        progress=False, **({"blocks": train.layout(2)} if not isinstance(train, torch.Tensor) else {}))  # fmt: skip
    return [p.detach() for p in head.parameters()]


@pytest.fixture
def memory_url() -> Iterator[str]:
    """A fresh prefix in the process-wide memory file system, removed afterwards."""
    root = f"hookmix-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{root}/rows"
    fsspec.filesystem("memory").rm(f"/{root}", recursive=True)


def test_a_cache_under_a_memory_url_holds_the_local_bytes_and_trains_the_local_head(
    tmp_path: Path, memory_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    remote, local = extract(memory_url), extract(tmp_path / "local")
    fs, root = fsspec.core.url_to_fs(memory_url)
    stored = {path.rsplit("/", 1)[-1]: fs.cat_file(path) for path in fs.find(root)}
    on_disk = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir() if not p.name.startswith(".")}
    manifests = [{**json.loads(files.pop("manifest.json")), "created": None} for files in (stored, on_disk)]
    assert stored == on_disk and manifests[0] == manifests[1] and len(stored) == 5  # shards byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local"]  # no folder named after the URL

    assert remote.path == memory_url and torch.equal(remote.features, local.features)
    for mmap in (False, True):  # loaded whole, and streamed block by block from the store
        head = trained_head(FeatureCache.load(memory_url, KEY, mmap=mmap))
        reference = trained_head(FeatureCache.load(tmp_path / "local", KEY, mmap=mmap))
        assert all(torch.equal(a, b) for a, b in zip(head, reference)), mmap

    shard = f"{root}/shard-00003.safetensors"
    data = bytearray(fs.cat_file(shard))
    data[-1] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    with pytest.raises(UsageError, match=f"shard {memory_url}/shard-00003.safetensors fails its checksum"):
        FeatureCache.load(memory_url, KEY)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("gs://bucket/cache", "needs a storage library for gs:// (.*); for s3:// install 'hookmix.cloud.' .*gcsfs"),
        ("nosuch://bucket/cache", "fsspec knows no protocol 'nosuch'; give a local path or e.g. s3://"),
    ],
)
def test_a_url_without_its_storage_library_or_with_an_unknown_scheme_is_one_line_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, expected: str
) -> None:
    if url.startswith("gs:") and importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here: gs:// has its storage library")
    monkeypatch.chdir(tmp_path)
    for call in (lambda: extract(url), lambda: FeatureCache.load(url, KEY)):
        with pytest.raises(UsageError, match=expected) as info:
            call()
        assert "\n" not in str(info.value) and url in str(info.value) and "--" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_shard_already_there_with_other_bytes_is_refused_naming_the_object_and_no_flag(memory_url: str) -> None:
    store = open_store(memory_url)
    store.write("shard-00000.safetensors", b"a run's bytes")
    with pytest.raises(StoreError, match="already exists with other bytes") as info:
        store.write("shard-00000.safetensors", b"other bytes")
    message = str(info.value)
    assert f"{memory_url}/shard-00000.safetensors" in message and "another prefix" in message
    assert "--" not in message  # the library is called with path=; the command line names its flags
