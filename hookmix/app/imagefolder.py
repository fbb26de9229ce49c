"""Image folders for ``hookmix finetune``: one sub-folder per class, split into train / validation.

Checks what ``torchvision.datasets.ImageFolder`` leaves to a confusing failure later: a missing or
empty folder, a single class, a class with too few images to split, and unreadable images. Every image
is checked up front from its header alone (:func:`hookmix.headonly.images.image_problem`: a format PIL reads, a
size under PIL's decompression-bomb limit, a pixel mode hookmix can turn into RGB), so a bad file is refused,
named, before the model reads any image; a file whose header is fine but whose data is not (truncated) is named
when the backbone reads it. Images are read by the library's :func:`hookmix.headonly.images.read_rgb` (16-bit
pixels scaled, not clipped), as ``hookmix predict`` and ``FinetunedModel.predict`` read them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from tqdm.auto import tqdm

from hookmix.app.preprocessing import Preprocessing, default_preprocessing
from hookmix.core.errors import UsageError
from hookmix.headonly.images import UnreadableImage, image_problem, read_rgb

__all__ = [
    "FolderSplit",
    "check_image_args",
    "load_image_folder",
    "load_rgb",
    "stratified_split",
]

_SHOWN = 3
"""How many unreadable files an error message lists."""


def load_rgb(path: str) -> Image.Image:
    """:func:`~hookmix.headonly.images.read_rgb` for a dataset: an unreadable file is a one-line error naming it."""
    try:
        return read_rgb(path)
    except UnreadableImage as exc:
        raise UsageError(f"unreadable image {path}: {exc}. Remove or replace the file and run again.") from None


def check_image_args(input_size: tuple[int, int, int], val_fraction: float) -> None:
    """Refuse a validation fraction outside (0, 1) and an input size whose channels are neither RGB nor grey."""
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val_fraction={val_fraction!r} must be in (0, 1), e.g. val_fraction=0.2.")
    if input_size[0] not in (1, 3):
        raise UsageError(
            f"--input-size {' '.join(map(str, input_size))} asks for {input_size[0]} channels, but images are read "
            "as RGB: use C=3 (or 1 for grayscale)."
        )


@dataclass(frozen=True)
class FolderSplit:
    """A class-per-folder dataset split into train / validation subsets, and how each reads its images."""

    train: Dataset
    val: Dataset
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    augmented: bool


def _image_folder(root: Path, transform: Callable[[Any], Any], flag: str, progress: bool) -> datasets.ImageFolder:
    if not root.is_dir():
        raise UsageError(f"{flag} {root} is not a directory; give a folder with one sub-folder per class.")
    try:
        folder = datasets.ImageFolder(root, transform=transform, loader=load_rgb)
    except FileNotFoundError as exc:
        raise UsageError(
            f"{flag} {root} holds no images in class sub-folders ({exc}); expected root/<class>/<image>.png."
        ) from None
    if len(folder.classes) < 2:
        raise UsageError(
            f"{flag} {root} has a single class {folder.classes}; classification needs at least two "
            "sub-folders of images."
        )
    _check_images(folder, root, flag, progress)
    return folder


def _check_images(folder: datasets.ImageFolder, root: Path, flag: str, progress: bool) -> None:
    """Refuse ``folder`` when any image's header shows it unreadable (:func:`image_problem`), listing the
    first few: before the model reads any image, not when extraction reaches it (about 70 us a file)."""
    paths = tqdm([path for path, _ in folder.samples], desc="check images", disable=not progress)
    bad = [(path, reason) for path in paths if (reason := image_problem(path)) is not None]
    if bad:
        shown = "; ".join(f"{os.path.relpath(path, root)} ({reason})" for path, reason in bad[:_SHOWN])
        more = "; ..." if len(bad) > _SHOWN else ""
        raise UsageError(
            f"{flag} {root} has {len(bad)} unreadable image(s) of {len(folder.samples)}: {shown}{more}. Remove or "
            "replace them and run again."
        )


def load_image_folder(
    root: str | Path,
    input_size: tuple[int, int, int],
    *,
    preprocessing: Preprocessing | None = None,
    val_root: str | Path | None = None,
    augment: bool = False,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = False,
) -> FolderSplit:
    """Read ``root`` (``root/<class>/<image>``) into training and validation data.

    Args:
        root: the training folder (``--data``).
        input_size: (C, H, W) of one model input (C = 1 reads images as grayscale).
        preprocessing: the model's (:mod:`hookmix.app.preprocessing`); ImageNet defaults when ``None``.
        val_root: a validation folder with the same class sub-folders (``--val``); without it each
            class of ``root`` is split by ``val_fraction``, keeping at least one image on each side.
        augment: read training images with the model's training transform (random crops and flips,
            for ``--views``); validation images always get the evaluation transform.
        progress: show a progress bar while every image's header is checked.
    """
    root = Path(root)
    check_image_args(input_size, val_fraction)
    preprocessing = (preprocessing or default_preprocessing()).with_input_size(input_size)
    evaluation = preprocessing.eval_transform()
    train = _image_folder(root, preprocessing.train_transform() if augment else evaluation, "--data", progress)
    if val_root is not None:
        val = _image_folder(Path(val_root), evaluation, "--val", progress)
        if val.classes != train.classes:
            raise UsageError(
                f"--val {val_root} has the classes {val.classes} but --data {root} has {train.classes}; give "
                "both folders the same class sub-folders."
            )
        return FolderSplit(train, val, tuple(train.classes), preprocessing, augment)
    train_idx, val_idx = stratified_split(train, val_fraction, seed)
    val_reader = datasets.ImageFolder(root, transform=evaluation, loader=load_rgb) if augment else train
    return FolderSplit(
        Subset(train, train_idx), Subset(val_reader, val_idx), tuple(train.classes), preprocessing, augment
    )


def stratified_split(folder: datasets.ImageFolder, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted training and validation indices of ``folder``: each class split by ``val_fraction`` at random
    (seeded), keeping at least one image on each side, so a class needs two images or more."""
    targets = torch.tensor(folder.targets)
    generator = torch.Generator().manual_seed(seed)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label, name in enumerate(folder.classes):
        members = torch.nonzero(targets == label).flatten()
        if len(members) < 2:
            raise UsageError(
                f"class {name!r} in {folder.root} has {len(members)} image; each class needs at least 2 "
                "(one for training, one for validation)."
            )
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        val_idx += members[:n_val].tolist()
        train_idx += members[n_val:].tolist()
    return sorted(train_idx), sorted(val_idx)
