"""The offline multi-label task: 2x2 mosaics of scikit-learn digits, labelled with the set of digits present.

Each mosaic is a ``(1, 16, 16)`` grey image in ``[0, 1]`` made of four ``8x8`` quadrants (row-major:
top-left, top-right, bottom-left, bottom-right); each quadrant is left blank (zeros) with probability
1/4, otherwise it holds a digit image drawn at random. The target is multi-hot over the ten digits
``"0"..."9"``: a digit placed twice counts once, and an all-blank mosaic has the empty label set (about
0.4 % of mosaics), a valid example with no positive label.

One channel, like :class:`hookmix.app.digits.DigitsCNN`: its convolutions and global average pool accept
any image size, so the single-digit network of :func:`hookmix.app.digits.pretrain_source` reads a
mosaic as is (``stage2`` gives ``(B, 64, 4, 4)`` maps) and a multi-label head is fine-tuned on its
features: the transfer setting of the digits task, with a new label space. That network was pretrained
on 80 % of the 0-4 images as single digits; the mosaics draw from all 1,797 images.

Training and validation mosaics are built from disjoint halves of the 1,797 images, so no digit image
appears on both sides. Everything is drawn from one ``torch.Generator`` seeded with ``seed``: equal
arguments give identical tensors. :func:`write_mosaics` saves a split as PNG files and labels CSVs, the
input of ``hookmix finetune --labels``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from hookmix.app.digits import TransferSplit, all_digits, check_seed
from hookmix.core.checks import is_int
from hookmix.core.errors import UsageError

__all__ = ["MOSAIC_CLASSES", "digits_mosaics", "write_mosaics"]

MOSAIC_CLASSES = tuple(str(digit) for digit in range(10))
_BLANK_PROBABILITY = 0.25
_TILE = 8


def _compose(pool: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` mosaics ``(n, 1, 16, 16)`` of images from ``pool`` (indices into the digits) and their
    multi-hot labels ``(n, 10)``."""
    images, labels = all_digits()
    picks = pool[torch.randint(len(pool), (n, 4), generator=generator)]
    placed = torch.rand(n, 4, generator=generator) >= _BLANK_PROBABILITY
    tiles = images[picks] * placed[..., None, None, None]  # (n, 4, 1, 8, 8)
    mosaics = tiles.view(n, 2, 2, 1, _TILE, _TILE).permute(0, 3, 1, 4, 2, 5).reshape(n, 1, 2 * _TILE, 2 * _TILE)
    present = F.one_hot(labels[picks], len(MOSAIC_CLASSES)) * placed[..., None]
    return mosaics, present.amax(dim=1).float()


def digits_mosaics(n_train: int, n_val: int, seed: int) -> TransferSplit:
    """``n_train`` training and ``n_val`` validation mosaics drawn with a generator seeded by ``seed``.

    The digit images are split in two random halves first (training mosaics use one, validation
    mosaics the other), then each mosaic draws its four quadrants from its half.
    """
    check_seed(seed)
    for name, count in (("n_train", n_train), ("n_val", n_val)):
        if not is_int(count, 1):
            raise UsageError(f"{name} must be a positive int (number of mosaics), got {count!r}; e.g. {name}=500.")
    generator = torch.Generator().manual_seed(seed)
    _, labels = all_digits()
    order = torch.randperm(len(labels), generator=generator)
    train_pool, val_pool = order[: len(order) // 2], order[len(order) // 2 :]
    train_x, train_y = _compose(train_pool, n_train, generator)
    val_x, val_y = _compose(val_pool, n_val, generator)
    return TransferSplit(train_x, train_y, val_x, val_y, MOSAIC_CLASSES)


def _write_part(root: Path, part: str, x: torch.Tensor, y: torch.Tensor, class_names: tuple[str, ...]) -> Path:
    (root / part).mkdir(parents=True, exist_ok=True)
    pixels = (x[:, 0] * 255).round().to(torch.uint8).numpy()
    csv_path = root / f"{part}.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "labels"])
        for index, (image, target) in enumerate(zip(pixels, y)):
            relative = f"{part}/{index:05d}.png"
            Image.fromarray(image, mode="L").save(root / relative)
            writer.writerow([relative, ";".join(class_names[i] for i in target.nonzero().flatten().tolist())])
    return csv_path


def write_mosaics(root: str | Path, split: TransferSplit) -> tuple[Path, Path]:
    """Save ``split`` under ``root`` as grey PNGs and labels CSVs; return ``(root/train.csv, root/val.csv)``.

    Images go to ``root/train/00000.png, ...`` and ``root/val/...`` with pixel values ``round(255 * x)``;
    each CSV has the columns ``path`` (relative to ``root``) and ``labels`` (the digits present, joined
    by ``;``, empty for an all-blank mosaic): ``hookmix finetune --labels root/train.csv --data root``.
    Existing files of the same names are overwritten.
    """
    if not isinstance(split, TransferSplit):
        raise TypeError(f"split must be the TransferSplit of digits_mosaics(...), got {type(split).__name__}.")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"root {root} is a file; give a directory to write the mosaics into.")
    return (
        _write_part(root, "train", split.train_x, split.train_y, split.class_names),
        _write_part(root, "val", split.val_x, split.val_y, split.class_names),
    )
