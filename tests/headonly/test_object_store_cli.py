"""``hookmix finetune --cache s3://bucket/prefix`` against a real S3 API served locally (moto, see conftest.py).

The training features are streamed from the bucket (``--memory-budget`` below their size), so every epoch reads
its shards from S3. Bugs these tests catch, and where:

* a remote cache keyed, laid out or read otherwise than a local one (another order, other bytes, a lost row):
  the head would differ -> ``test_finetune_with_an_s3_cache_trains_the_head_a_local_cache_trains``, which also
  checks that the second run reuses the cache in the bucket;
* a fault that ends in a botocore / aiohttp traceback, or in a line that does not say which object ->
  ``test_a_fault_in_the_store_ends_in_one_line_naming_the_object`` (a missing shard, a truncated object,
  refused credentials, the server going away mid-epoch; exit code 2 each);
* a URL taken for a directory (``Path`` folds ``s3://`` into ``s3:/``, a local folder is created), or a store
  whose library is missing found only after the model is built ->
  ``test_a_url_without_its_storage_library_is_refused_before_the_model_loads``;
* torchrun without ``--cache`` found only after the ranks met (or with a traceback) ->
  ``test_torchrun_without_a_cache_is_refused_in_one_line_before_the_ranks_meet`` (torchrun's environment set in
  this process: no launch); torchrun with an s3:// cache works: ``tests/app/test_torchrun.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hookmix.app.cli import main
from hookmix.headonly.store import RemoteStore, open_store
from tests.conftest import write_folder

SMALL = ("--model", "resnet18", "--input-size", "3", "32", "32", "--quiet", "--memory-budget", "4K")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data") / "imgs", per_class=4, size=32)


def finetune(images: Path, out: Path, cache: str | Path, *extra: str) -> int:
    return main(["finetune", "--data", str(images), *SMALL, "--out", str(out), "--cache", str(cache), *extra])


def train_store(cache: str) -> RemoteStore:
    """The store of the one training cache under ``cache``."""
    root = open_store(cache)
    assert isinstance(root, RemoteStore)
    [directory] = [p for p in root.fs.ls(root._root, detail=False) if p.rsplit("/", 1)[-1].startswith("train")]
    store = open_store(f"{cache}/{directory.rsplit('/', 1)[-1]}")
    assert isinstance(store, RemoteStore)
    return store


def test_finetune_with_an_s3_cache_trains_the_head_a_local_cache_trains(
    tmp_path: Path, images: Path, s3_bucket: str, capsys: pytest.CaptureFixture
) -> None:
    url = f"s3://{s3_bucket}/hookmix-cache"
    assert finetune(images, tmp_path / "local", tmp_path / "cache", "--epochs", "2") == 0
    assert finetune(images, tmp_path / "s3", url, "--epochs", "2") == 0
    said = capsys.readouterr().out
    assert f"streamed from {url}/train" in said
    local, remote = load_file(tmp_path / "local" / "head.safetensors"), load_file(tmp_path / "s3" / "head.safetensors")
    assert local.keys() == remote.keys() and all(torch.equal(local[k], remote[k]) for k in local)  # bitwise

    local_names = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert sorted(p.rsplit("/", 1)[-1] for p in open_store(url).fs.ls(url, detail=False)) == local_names
    assert finetune(images, tmp_path / "again", url, "--epochs", "1") == 0
    assert f"reusing the train cache in {url}/train" in capsys.readouterr().out


def break_missing(store: RemoteStore, server) -> None:
    store.fs.rm_file(f"{store._root}/shard-00000.safetensors")


def break_truncated(store: RemoteStore, server) -> None:
    path = f"{store._root}/shard-00000.safetensors"
    store.fs.pipe_file(path, store.fs.cat_file(path)[:-100])


@pytest.mark.parametrize(
    "fault, expected",
    [
        (break_missing, "shard {train}/shard-00000.safetensors listed in manifest.json is missing"),
        (break_truncated, "shard {train}/shard-00000.safetensors is "),
        ("credentials", " {train}/manifest.json failed: PermissionError"),
        ("server gone", "reading {train}/shard-00000.safetensors failed: "),
    ],
    ids=["missing shard", "truncated object", "refused credentials", "server gone mid-epoch"],
)
def test_a_fault_in_the_store_ends_in_one_line_naming_the_object(
    tmp_path: Path,
    images: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
    fault,
    expected,
) -> None:
    server = request.getfixturevalue("private_s3" if fault == "server gone" else "s3_env")
    bucket = "hookmix" if fault == "server gone" else request.getfixturevalue("s3_bucket")
    url = f"s3://{bucket}/hookmix-cache"
    assert finetune(images, tmp_path / "first", url, "--epochs", "1") == 0
    train = train_store(url)
    if fault == "credentials":
        request.getfixturevalue("s3_auth")()
    elif fault == "server gone":
        fetch, fetched = RemoteStore.fetch, []

        def die_in_the_second_epoch(self: RemoteStore, name: str, *args):
            if self.path == train.path:
                fetched.append(name)
            if len(fetched) == 2:  # the first epoch read the training shard: the store goes away
                server.kill()
            return fetch(self, name, *args)

        monkeypatch.setattr(RemoteStore, "fetch", die_in_the_second_epoch)
    else:
        fault(train, server)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        finetune(images, tmp_path / "second", url, "--epochs", "2")
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("hookmix: error: "), err
    assert expected.format(train=train.path) in err, err


@pytest.mark.parametrize(
    "url, expected",
    [("gs://bucket/cache", "needs a storage library for gs:// "), ("nosuch://x", "fsspec knows no protocol 'nosuch'")],
)
def test_a_url_without_its_storage_library_is_refused_before_the_model_loads(
    tmp_path: Path, images: Path, capsys, url: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if url.startswith("gs:") and importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here: gs:// has its storage library")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        finetune(images, tmp_path / "out", url)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and f"--cache {url}" in err and expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither --out nor a folder named after the URL


def test_torchrun_without_a_cache_is_refused_in_one_line_before_the_ranks_meet(
    tmp_path: Path, images: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():  # rank 0 of 2, no MASTER_ADDR
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--data", str(images), *SMALL, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert "torchrun with 2 processes needs --cache (no --cache given)" in err and "s3://bucket/prefix" in err, err
    assert not torch.distributed.is_initialized()
