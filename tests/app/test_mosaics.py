"""The embedded multi-label task: mosaic labels checked against the scikit-learn images placed in them, seeding,
disjoint train / validation images, the PNG + CSV writer read back by the labels-CSV loader, and the
single-digit source CNN as a backbone for mosaics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from hookmix.app.digits import TransferSplit, pretrain_source
from hookmix.app.labels_csv import load_labels_csv
from hookmix.app.mosaics import MOSAIC_CLASSES, digits_mosaics, write_mosaics
from hookmix.app.preprocessing import Preprocessing
from hookmix.evaluation.metrics import evaluate_multilabel

DIGITS = load_digits()
SOURCE = {
    (image / 16.0).astype(np.float32).tobytes(): (index, int(label))
    for index, (image, label) in enumerate(zip(DIGITS.images, DIGITS.target))
}
"""Every scikit-learn digit image (no two are equal) -> (its index, its digit)."""


def quadrants(mosaic: torch.Tensor) -> list[torch.Tensor]:
    """The four 8x8 quadrants of a (1, 16, 16) mosaic, row-major."""
    return [mosaic[0, r : r + 8, c : c + 8] for r in (0, 8) for c in (0, 8)]


def placed(x: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per mosaic, the (source index, digit) of each non-blank quadrant, found by exact comparison."""
    found = []
    for mosaic in x:
        tiles = [tile for tile in quadrants(mosaic) if tile.any()]
        found.append([SOURCE[tile.numpy().astype(np.float32).tobytes()] for tile in tiles])
    return found


def test_labels_are_the_set_of_digits_placed() -> None:
    split = digits_mosaics(120, 60, seed=3)
    assert split.train_x.shape == (120, 1, 16, 16) and split.val_x.shape == (60, 1, 16, 16)
    assert split.train_y.shape == (120, 10) and split.train_y.dtype == torch.float32
    assert split.class_names == MOSAIC_CLASSES == tuple("0123456789")
    sizes = []
    for x, y in ((split.train_x, split.train_y), (split.val_x, split.val_y)):
        for tiles, target in zip(placed(x), y):
            digits = {digit for _, digit in tiles}
            assert set(torch.nonzero(target).flatten().tolist()) == digits
            sizes.append(len(tiles))
    assert set(sizes) >= {2, 3, 4}  # quadrants are left blank at times, not always


def test_an_all_blank_mosaic_has_the_empty_label_set() -> None:
    split = digits_mosaics(2000, 1, seed=0)
    blank = split.train_x.flatten(1).amax(dim=1) == 0
    assert 0 < int(blank.sum()) < 40  # (1/4)^4 of 2000 is about 8
    assert split.train_y[blank].sum() == 0 and (split.train_y[~blank].sum(dim=1) >= 1).all()


def test_train_and_validation_mosaics_use_disjoint_digit_images() -> None:
    split = digits_mosaics(300, 300, seed=1)
    train = {index for tiles in placed(split.train_x) for index, _ in tiles}
    val = {index for tiles in placed(split.val_x) for index, _ in tiles}
    assert train and val and not train & val


def test_the_seed_alone_decides_the_mosaics() -> None:
    first, again, other = digits_mosaics(50, 20, 7), digits_mosaics(50, 20, 7), digits_mosaics(50, 20, 8)
    for name in ("train_x", "train_y", "val_x", "val_y"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.train_x, other.train_x)


def test_written_mosaics_read_back_through_the_labels_csv(tmp_path: Path) -> None:
    split = digits_mosaics(40, 15, seed=2)
    train_csv, val_csv = write_mosaics(tmp_path, split)
    assert (train_csv, val_csv) == (tmp_path / "train.csv", tmp_path / "val.csv")
    assert train_csv.read_text().splitlines()[0] == "path,labels"
    identity = Preprocessing("imagenet-default", (1, 16, 16), (0.0,), (1.0,), "bilinear", 1.0)
    data = load_labels_csv(train_csv, tmp_path, (1, 16, 16), preprocessing=identity, val_labels=val_csv)
    present = split.train_y.sum(dim=0) > 0  # the classes are the labels seen in training
    assert data.classes == tuple(name for name, seen in zip(MOSAIC_CLASSES, present) if seen)
    assert torch.equal(data.train.targets, split.train_y[:, present])
    assert torch.equal(data.val.targets, split.val_y[:, present])
    x, y = data.val[4]
    assert torch.allclose(x, split.val_x[4], atol=0.5 / 255 + 1e-6)
    assert torch.equal(y, split.val_y[4, present])


def test_the_single_digit_source_cnn_reads_mosaics_and_transfers() -> None:
    """DigitsCNN pools globally, so the network pretrained on 8x8 digits 0-4 reads 16x16 mosaics; a
    multi-label linear head on its pooled stage2 features ranks all ten digits far above chance."""
    model = pretrain_source(seed=0)
    split = digits_mosaics(300, 200, seed=0)
    with torch.no_grad():
        maps = model.stage2(model.stage1(model.stem(split.train_x)))
        assert maps.shape == (300, 64, 4, 4) and model(split.val_x).shape == (200, 5)
        val_features = model.stage2(model.stage1(model.stem(split.val_x))).mean(dim=(2, 3))
    features = maps.mean(dim=(2, 3))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = torch.nn.Linear(64, 10)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(head(features), split.train_y).backward()
        optimizer.step()
    with torch.no_grad():
        found = evaluate_multilabel(head(val_features), split.val_y)
    chance = split.val_y.mean().item()  # the mAP of a random ranking is about the positive rate
    assert chance < 0.35 and found["map"] > 0.6


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_train": 0, "n_val": 5, "seed": 0}, ValueError, r"n_train must be a positive int.*got 0"),
        ({"n_train": 5, "n_val": 2.0, "seed": 0}, ValueError, r"n_val must be a positive int.*got 2.0"),
        ({"n_train": 5, "n_val": 5, "seed": -1}, ValueError, r"seed must lie in \[0, 2\*\*63\), got -1"),
        ({"n_train": 5, "n_val": 5, "seed": "0"}, TypeError, "seed must be an int"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        digits_mosaics(**kwargs)


def test_write_mosaics_rejects_a_file_and_a_wrong_split(tmp_path: Path) -> None:
    split = digits_mosaics(2, 2, seed=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"root .*file is a file; give a directory"):
        write_mosaics(tmp_path / "file", split)
    with pytest.raises(TypeError, match="split must be the TransferSplit of digits_mosaics"):
        write_mosaics(tmp_path, (split.train_x, split.train_y))  # type: ignore[arg-type]
    assert isinstance(split, TransferSplit) and split.num_classes == 10
