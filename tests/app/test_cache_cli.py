"""``hookmix finetune --cache DIR`` serves only features of the same data and settings (issue 20, items 2 and 6).

Each cache lives in ``DIR/<part>[.<ops>]-<12 hex digits of its key, dtype and views>``; the key holds the data's
identity (file names, labels, sizes and mtimes). Bugs these tests catch:

* a key of the folder path and image count only: three images overwritten under the same names and one moved
  to another class, and the old features train the head ->
  ``test_changed_images_are_extracted_again_and_train_the_head_a_fresh_run_would``;
* two runs with other settings (``--fp32``) on one ``--cache``: the second refused with advice to delete the
  first one's valid cache, or served the other dtype ->
  ``test_runs_with_other_settings_keep_their_caches_side_by_side``, which also checks that a run with the
  same data and cache settings reuses the cache and says so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from hookmix.app.cli import main
from tests.conftest import write_folder

SMALL = ("--model", "resnet18", "--input-size", "3", "32", "32", "--epochs", "1", "--quiet")


def finetune(data: Path, out: Path, cache: Path, *extra: str) -> dict:
    assert main(["finetune", "--data", str(data), *SMALL, "--out", str(out), "--cache", str(cache), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def train_caches(cache: Path) -> list[Path]:
    return sorted(cache.glob("train.avgpool+flatten-*"))


def head(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "head.safetensors")


def test_changed_images_are_extracted_again_and_train_the_head_a_fresh_run_would(tmp_path: Path, capsys) -> None:
    data = write_folder(tmp_path / "imgs", per_class=5, size=32)
    cache = tmp_path / "cache"
    finetune(data, tmp_path / "first", cache)
    rng = np.random.default_rng(1)
    for name in ("cat/0.png", "dog/1.png", "eel/2.png"):  # overwritten under the same names
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(data / name)
    shutil.move(data / "cat" / "3.png", data / "dog" / "9.png")  # moved to another class
    changed = finetune(data, tmp_path / "changed", cache)
    assert "reusing the train cache" not in capsys.readouterr().out
    fresh = finetune(data, tmp_path / "fresh", tmp_path / "fresh-cache")
    for name, tensor in head(tmp_path / "fresh").items():
        assert torch.equal(head(tmp_path / "changed")[name], tensor), name  # same process: bitwise
    assert changed["history"] == fresh["history"] and changed["train_examples"] == fresh["train_examples"]
    assert len(train_caches(cache)) == 2  # the old data's cache is kept: it stays valid for the old images
    stored = [json.loads((path / "manifest.json").read_text())["key"]["dataset"] for path in train_caches(cache)]
    assert all(key.startswith("train:files:") for key in stored) and stored[0] != stored[1]


def test_runs_with_other_settings_keep_their_caches_side_by_side(tmp_path: Path, capsys) -> None:
    data = write_folder(tmp_path / "imgs", per_class=3, size=32)
    cache = tmp_path / "cache"
    half = finetune(data, tmp_path / "half", cache)
    full = finetune(data, tmp_path / "full", cache, "--fp32")
    assert "reusing" not in capsys.readouterr().out
    dtypes = sorted(json.loads((path / "manifest.json").read_text())["dtype"] for path in train_caches(cache))
    assert dtypes == ["float16", "float32"]
    assert half["cache_bytes_per_example"] == 512 * 2 and full["cache_bytes_per_example"] == 512 * 4
    finetune(data, tmp_path / "again", cache, "--fp32", "--batch-size", "5")  # the batch size is no cache setting
    assert "reusing the train cache in" in capsys.readouterr().out and len(train_caches(cache)) == 2
