"""The labels CSV of ``hookmix finetune --labels CSV --data ROOT``: rows become images with multi-hot targets
over the training labels, the split is seeded, and every bad input gets a one-line message or a reported skip.

Plausible maintainer bugs in the augmentation path, and the test that catches each:

* ``augment`` ignored (training rows read with the evaluation transform), or the validation rows given the
  random training transform -> ``test_augmented_training_rows_get_the_model_s_training_transform``;
* the training transform built at another size or normalisation than the model's
  -> ``test_augmented_training_rows_get_the_model_s_training_transform`` (equal to timm's, same seeds);
* ``--views`` not reaching a multi-label run's cache (one view cached, or views that repeat one image)
  -> ``test_views_of_a_labels_csv_run_are_cached_augmented``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image
from safetensors.torch import load_file

from hookmix.app.cli import main
from hookmix.app.labels_csv import LabeledImages, load_labels_csv, read_labels_csv
from hookmix.app.mosaics import digits_mosaics, write_mosaics
from hookmix.app.preprocessing import default_preprocessing

SIZE = (3, 16, 16)


def image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for i, name in enumerate(("a.png", "b.png", "sub/c.png", "d.png", "e.png", "f.png")):
        image(tmp_path / "images" / name, seed=i)
    return tmp_path / "images"


def test_rows_become_images_with_multi_hot_targets(root: Path, tmp_path: Path) -> None:
    absolute = root / "d.png"
    train = write_csv(
        tmp_path / "train.csv",
        'notes,path,labels\nfirst,a.png,cat;dog\n,b.png,\n"x, y",sub/c.png, dog ;\n,' + f"{absolute},eel;cat\n",
    )
    val = write_csv(tmp_path / "val.csv", "path,labels\ne.png,eel\nf.png,\n")
    data = load_labels_csv(train, root, SIZE, val_labels=val)
    assert data.classes == ("cat", "dog", "eel")
    assert data.train.targets.tolist() == [[1, 1, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert data.val.targets.tolist() == [[0, 0, 1], [0, 0, 0]]
    assert data.train.paths == [str(root / name) for name in ("a.png", "b.png", "sub/c.png", "d.png")]
    assert data.skipped == () and not data.augmented
    x, y = data.train[3]
    expected = default_preprocessing(SIZE).eval_transform()(Image.open(absolute).convert("RGB"))
    assert x.shape == SIZE and x.dtype == torch.float32 and torch.equal(x, expected)
    assert y.dtype == torch.float32 and y.tolist() == [1.0, 0.0, 1.0]


def test_grayscale_input_size_reads_one_channel(root: Path, tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", "path,labels\na.png,cat\nb.png,dog\n")
    val = write_csv(tmp_path / "val.csv", "path,labels\ne.png,dog\n")
    x, _ = load_labels_csv(train, root, (1, 16, 16), val_labels=val).val[0]
    assert x.shape == (1, 16, 16)


def test_the_split_is_seeded_and_keeps_a_label_seen_once_in_training(root: Path, tmp_path: Path) -> None:
    for i in range(20):
        image(root / f"many/{i}.png", seed=10 + i)
    rows = [f"many/{i}.png,common" for i in range(20)] + ["a.png,rare;common"]
    labels = write_csv(tmp_path / "labels.csv", "path,labels\n" + "\n".join(rows) + "\n")
    splits = {}
    for seed in range(6):
        data = load_labels_csv(labels, root, SIZE, val_fraction=0.5, seed=seed)
        assert data.classes == ("common", "rare")
        assert str(root / "a.png") in data.train.paths  # never in validation: training would not know "rare"
        assert not set(data.train.paths) & set(data.val.paths)
        assert sorted(data.train.paths + data.val.paths) == sorted(str(root / r.split(",")[0]) for r in rows)
        assert (data.val.targets[:, 1] == 0).all()
        splits[seed] = data.val.paths
    # round(21 * 0.5) = 10 rows are drawn for validation; 9 remain when the "rare" row was drawn and moved
    assert {len(paths) for paths in splits.values()} == {9, 10}
    assert load_labels_csv(labels, root, SIZE, val_fraction=0.5, seed=3).val.paths == splits[3]
    assert len({tuple(paths) for paths in splits.values()}) > 1


def test_unreadable_images_are_skipped_and_reported(root: Path, tmp_path: Path) -> None:
    (root / "text.png").write_text("not an image")
    good = (root / "a.png").read_bytes()
    (root / "cut.png").write_bytes(good[: len(good) // 2])
    train = write_csv(tmp_path / "train.csv", "path,labels\na.png,cat\ntext.png,dog\nb.png,dog\ncut.png,cat\n")
    val = write_csv(tmp_path / "val.csv", "path,labels\ne.png,cat\n")
    data = load_labels_csv(train, root, SIZE, val_labels=val)
    assert data.train.paths == [str(root / "a.png"), str(root / "b.png")]
    assert len(data.skipped) == 2
    assert data.skipped[0].startswith(f"--labels {train} line 3: {root / 'text.png'} (")
    assert data.skipped[1].startswith(f"--labels {train} line 5: {root / 'cut.png'} (")
    assert [len(data.train[i][0]) for i in range(2)] == [3, 3]


def test_an_image_that_fails_later_names_its_path(root: Path, tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", "path,labels\na.png,cat\nb.png,dog\n")
    data = load_labels_csv(train, root, SIZE, val_labels=write_csv(tmp_path / "v.csv", "path,labels\ne.png,cat\n"))
    (root / "b.png").write_text("replaced by text after the check")
    with pytest.raises(ValueError, match=r"unreadable image .*b\.png"):
        data.train[1]


def test_read_labels_csv_gives_rows_with_lines(root: Path, tmp_path: Path) -> None:
    rows = read_labels_csv(write_csv(tmp_path / "l.csv", "path,labels\n\na.png,x;y;x\nb.png,\n"), root)
    assert [(row.path, row.labels, row.line) for row in rows] == [
        (root / "a.png", ("x", "y"), 3),
        (root / "b.png", (), 4),
    ]
    assert isinstance(LabeledImages(rows, ("x", "y"), lambda img: img).targets, torch.Tensor)


TWO = "path,labels\na.png,x\nb.png,y\n"
BAD_CSVS = [
    # (train CSV text, None for a missing file; val CSV text or None; the expected message)
    (None, None, r"--labels .*train\.csv does not exist; give a CSV file with the columns path,labels"),
    ("", None, r"train\.csv is empty; its first line must be the header path,labels"),
    (
        "file,tags\na.png,x\n",
        None,
        r"train\.csv line 1: the header has the columns \['file', 'tags'\] but not \['path', 'labels'\]; name",
    ),
    ("path,label\na.png,x\n", None, r"the header has the columns \['path', 'label'\] but not \['labels'\]"),
    ("path,labels\n", None, r"has a header but no rows"),
    ("path,labels\na.png,x\nb.png\n", None, r"train\.csv line 3 has fewer fields than the header"),
    ("path,labels\n,x\n", None, r"train\.csv line 2 has an empty path"),
    (TWO + "./a.png,z\n", None, r"train\.csv line 4 lists \./a\.png again \(first on line 2\); keep one row per"),
    (
        "path,labels\na.png,x\nnope.png,y\nb.png,x\ngone/1.png,\n",
        None,
        r"train\.csv: 2 of 4 image paths do not exist \(line 3: .*nope\.png, line 5: .*gone/1\.png\); paths are "
        "relative to --data",
    ),
    ("path,labels\na.png,\nb.png,\n", None, r"no training row has a label \(every labels field is empty\)"),
    ("path,labels\na.png,x\n", None, r"has 1 readable image; splitting off validation needs at least 2"),
    (TWO, None, r"every validation row has a label that no other row has"),
    (
        TWO,
        "path,labels\ne.png,x\nf.png,y;zebra\n",
        r"--val-labels .*val\.csv line 3 has the label 'zebra', which no training row of --labels .*train\.csv has",
    ),
    (
        TWO,
        "path,labels\ne.png,x\nb.png,y\n",
        r"val\.csv line 3 lists .*b\.png, which --labels .*train\.csv line 3 already has; validation images must not",
    ),
    (TWO, "path,labels\nmissing.png,x\n", r"--val-labels .*val\.csv: 1 of 1 image paths do not exist"),
    (b"path,labels\n\xff\xfe.png,x\n", None, r"cannot be read as a UTF-8 CSV file"),
]


@pytest.mark.parametrize(("train_text", "val_text", "match"), BAD_CSVS)
def test_bad_csvs_get_a_message_naming_file_and_line(
    root: Path, tmp_path: Path, train_text: str | bytes | None, val_text: str | None, match: str
) -> None:
    train = tmp_path / "train.csv"
    if isinstance(train_text, bytes):
        train.write_bytes(train_text)
    elif train_text is not None:
        write_csv(train, train_text)
    val = None if val_text is None else write_csv(tmp_path / "val.csv", val_text)
    with pytest.raises(ValueError, match=match) as info:
        load_labels_csv(train, root, SIZE, val_labels=val)
    assert "\n" not in str(info.value)


def test_bad_arguments(root: Path, tmp_path: Path) -> None:
    train = write_csv(tmp_path / "train.csv", "path,labels\na.png,x\nb.png,x\n")
    with pytest.raises(ValueError, match=r"val_fraction=1\.5 must be in \(0, 1\)"):
        load_labels_csv(train, root, SIZE, val_fraction=1.5)
    with pytest.raises(ValueError, match="asks for 4 channels"):
        load_labels_csv(train, root, (4, 16, 16))
    with pytest.raises(ValueError, match=r"--labels .* is a directory; give a CSV file"):
        load_labels_csv(tmp_path, root, SIZE)


def test_no_readable_image_at_all(root: Path, tmp_path: Path) -> None:
    (root / "text.png").write_text("not an image")
    train = write_csv(tmp_path / "train.csv", "path,labels\ntext.png,x\n")
    with pytest.raises(ValueError, match=r"no image could be read \(--labels .*line 2: .*text\.png"):
        load_labels_csv(train, root, SIZE)


def seeded(seed: int, draw):
    """``draw()`` with Python's and torch's generators seeded (timm's random crop draws from the first,
    torchvision's flip and colour jitter from the second)."""
    random.seed(seed)
    torch.manual_seed(seed)
    return draw()


def test_augmented_training_rows_get_the_model_s_training_transform(root: Path, tmp_path: Path) -> None:
    """augment=True: a training item is timm's training transform of the image at the input size and ImageNet
    normalisation (the same tensor under the same seeds), and differs from draw to draw; a validation item is
    the evaluation transform (timm's, crop_pct 0.875), the same every time."""
    train = write_csv(tmp_path / "train.csv", "path,labels\na.png,cat\nb.png,dog\nsub/c.png,dog\n")
    val = write_csv(tmp_path / "val.csv", "path,labels\ne.png,cat\n")
    data = load_labels_csv(train, root, SIZE, val_labels=val, augment=True)
    assert data.augmented
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    training = timm.data.create_transform(SIZE, is_training=True, interpolation="bilinear", mean=mean, std=std)
    picture = Image.open(root / "a.png").convert("RGB")
    draws = [seeded(seed, lambda: data.train[0][0]) for seed in (0, 1)]
    for seed, x in zip((0, 1), draws):
        assert torch.equal(x, seeded(seed, lambda: training(picture)))
    assert not torch.equal(draws[0], draws[1])
    evaluation = timm.data.create_transform(SIZE, crop_pct=0.875, interpolation="bilinear", mean=mean, std=std)
    expected = evaluation(Image.open(root / "e.png").convert("RGB"))
    assert torch.equal(seeded(0, lambda: data.val[0][0]), expected) and torch.equal(data.val[0][0], expected)
    assert data.train[0][1].tolist() == [1.0, 0.0]


@pytest.mark.slow
def test_views_of_a_labels_csv_run_are_cached_augmented(tmp_path: Path) -> None:
    """``finetune --labels CSV --views 2``: the training cache holds two different views of every row (its
    manifest says 2, its features are (2, N, D)); the validation cache one, read with the evaluation transform."""
    write_mosaics(tmp_path / "m", digits_mosaics(24, 8, 0))
    data = ["--data", str(tmp_path / "m"), "--labels", str(tmp_path / "m" / "train.csv")]
    model = ["--model", "digits-cnn", "--input-size", "1", "16", "16", "--epochs", "1", "--quiet"]
    cache = tmp_path / "cache"
    assert main(["finetune", *data, *model, "--views", "2", "--cache", str(cache), "--out", str(tmp_path / "r")]) == 0
    manifests = {p.parent.name.split(".")[0]: json.loads(p.read_text()) for p in cache.glob("*/manifest.json")}
    assert (manifests["train"]["views"], manifests["val"]["views"]) == (2, 1)
    assert manifests["train"]["key"]["transform"] != manifests["val"]["key"]["transform"]
    (train_dir,) = [p.parent for p in cache.glob("train*/manifest.json")]
    features = load_file(train_dir / "shard-00000.safetensors")["features"]
    assert features.shape[:2] == (2, manifests["train"]["count"])
    assert (features[0] != features[1]).any(dim=1).all()  # every row's two views differ
