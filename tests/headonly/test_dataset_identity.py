"""The data's identity in a cache key (:mod:`hookmix.headonly.dataset_identity`, :mod:`hookmix.app.data_identity`).

Bugs these tests catch, and where:

* an identity of the folder path and row count only, blind to an overwritten image, a file moved to another
  class, a renamed or added file -> ``test_a_folder_keeps_its_identity_until_a_file_or_its_label_changes``;
* the folder's absolute path inside the identity (a moved folder would extract again for nothing) -> same test;
* a content hash that is not one (``hash_content`` ignored), or a stat mode that claims to see what only the
  bytes show -> ``test_only_hash_content_sees_a_replacement_of_the_same_size_and_mtime``;
* the split ignored (train and val, or two splits, sharing an identity), ``Subset`` indices composed in the
  wrong order, a tensor's dtype or one changed value missed -> ``test_subsets_and_tensors_fingerprint_their_rows``;
* a labels-CSV row whose label set changes keeping its identity -> ``test_a_labels_csv_row_enters_with_its_labels``;
* digits tasks of other shots or seeds sharing one identity -> ``test_digits_tasks_differ_by_shots_and_seed``;
* an unknown dataset fingerprinted as something else, a vanished file as a traceback ->
  ``test_an_unknown_dataset_and_a_missing_file_are_refused``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision.datasets import ImageFolder

from hookmix.app.data_identity import data_identity
from hookmix.app.digits import digits_transfer
from hookmix.app.labels_csv import load_labels_csv
from hookmix.core.errors import UsageError
from hookmix.headonly.dataset_identity import dataset_fingerprint, files_fingerprint, tensors_fingerprint
from tests.conftest import write_folder


def fingerprint(root: Path, **kwargs) -> str:
    return dataset_fingerprint(ImageFolder(root, loader=lambda path: path), **kwargs)


def _later(path: Path) -> None:
    """Move ``path``'s mtime one second on, as a write a moment later would."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_a_folder_keeps_its_identity_until_a_file_or_its_label_changes(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "a", per_class=3, size=8)
    first = fingerprint(root)
    assert first.startswith("files:9:stat:") and fingerprint(root) == first
    root = root.rename(tmp_path / "moved")  # the same files elsewhere: the same data
    assert fingerprint(root) == first
    seen = [first]

    def changed(change) -> None:
        change()
        seen.append(fingerprint(root))

    image = root / "cat" / "0.png"
    changed(lambda: (image.write_bytes(image.read_bytes()[::-1]), _later(image)))  # overwritten, same name
    changed(lambda: (root / "cat" / "1.png").rename(root / "dog" / "1b.png"))  # moved to another class
    changed(lambda: (root / "eel" / "2.png").rename(root / "eel" / "9.png"))  # renamed
    changed(lambda: shutil.copy2(root / "eel" / "0.png", root / "eel" / "7.png"))  # added (same bytes, mtime)
    changed(lambda: _later(root / "dog" / "0.png"))  # touched: needless, never stale
    assert len(set(seen)) == len(seen)


def test_only_hash_content_sees_a_replacement_of_the_same_size_and_mtime(tmp_path: Path) -> None:
    """``cp -p`` of another version of a file keeps size and mtime: the documented gap of the stat mode."""
    root = write_folder(tmp_path / "a", per_class=2, size=8)
    stat_before, hashed_before = fingerprint(root), fingerprint(root, hash_content=True)
    image = root / "dog" / "1.png"
    stat = image.stat()
    image.write_bytes(image.read_bytes()[::-1])
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hashed_before.startswith("files:6:sha256:") and hashed_before != stat_before
    assert fingerprint(root) == stat_before
    assert fingerprint(root, hash_content=True) != hashed_before


def test_subsets_and_tensors_fingerprint_their_rows(tmp_path: Path) -> None:
    folder = ImageFolder(write_folder(tmp_path / "a", per_class=2, size=8), loader=lambda path: path)
    assert dataset_fingerprint(Subset(folder, [0, 1, 2])) != dataset_fingerprint(Subset(folder, [0, 1, 3]))
    assert dataset_fingerprint(Subset(folder, [0, 1])) != dataset_fingerprint(Subset(folder, [1, 0]))  # order
    nested = Subset(Subset(folder, [5, 3, 2, 0]), [1, 2])  # rows 3 and 2 of the folder
    assert dataset_fingerprint(nested) == dataset_fingerprint(Subset(folder, [3, 2]))
    assert dataset_fingerprint(Subset(folder, range(6))) == dataset_fingerprint(folder)

    x, y = torch.arange(24.0).view(6, 4), torch.arange(6)
    data = TensorDataset(x, y)
    assert dataset_fingerprint(data) == tensors_fingerprint(x, y) and tensors_fingerprint(x, y).startswith("tensors:6:")
    assert dataset_fingerprint(Subset(data, [4, 1])) == tensors_fingerprint(x[[4, 1]], y[[4, 1]])
    nudged = x.clone()
    nudged[5, 3] += 1e-6
    assert tensors_fingerprint(nudged, y) != tensors_fingerprint(x, y)
    assert tensors_fingerprint(x.double(), y) != tensors_fingerprint(x, y)
    assert tensors_fingerprint(x, y.view(6, 1)) != tensors_fingerprint(x, y)


def test_a_labels_csv_row_enters_with_its_labels(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "a", per_class=2, size=8)
    rows = ["path,labels", "cat/0.png,cat;dog", "cat/1.png,cat", "dog/0.png,dog", "dog/1.png,dog;eel"]
    val = tmp_path / "val.csv"
    val.write_text("path,labels\neel/0.png,eel\neel/1.png,cat\n")

    def identities(lines: list[str]) -> tuple[str, str]:
        (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
        split = load_labels_csv(tmp_path / "train.csv", root, (3, 8, 8), val_labels=val)
        return data_identity(split.train), data_identity(split.val)

    train, val_identity = identities(rows)
    assert train.startswith("files:4:stat:") and val_identity.startswith("files:2:stat:")
    assert identities(rows) == (train, val_identity)
    relabelled, _ = identities([*rows[:-1], "dog/1.png,eel"])  # one row's label set changes
    assert relabelled != train
    assert data_identity(ImageFolder(root, loader=lambda path: path)) == dataset_fingerprint(ImageFolder(root))


def test_digits_tasks_differ_by_shots_and_seed() -> None:
    def identity(shots: int, seed: int, part: str = "train") -> str:
        task = digits_transfer(shots, seed)
        return data_identity(TensorDataset(getattr(task, f"{part}_x"), getattr(task, f"{part}_y")))

    base = identity(20, 0)
    assert base == identity(20, 0) and base.startswith("tensors:100:")
    assert len({base, identity(20, 1), identity(10, 0), identity(20, 0, "val")}) == 4


def test_an_unknown_dataset_and_a_missing_file_are_refused(tmp_path: Path) -> None:
    class Listed(Dataset):
        def __len__(self) -> int:
            return 1

    with pytest.raises(TypeError, match="does not know Listed; pass files_fingerprint"):
        dataset_fingerprint(Subset(Listed(), [0]))
    with pytest.raises(UsageError, match=f"cannot read {tmp_path / 'gone.png'} to fingerprint the data"):
        files_fingerprint([(tmp_path / "gone.png", "cat")])
    with pytest.raises(UsageError, match="got no rows"):
        files_fingerprint([])
