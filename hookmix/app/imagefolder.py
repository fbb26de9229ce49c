"""Image folders for ``hookmix finetune``: one sub-folder per class, split into train / validation.

Checks what ``torchvision.datasets.ImageFolder`` leaves to a confusing failure later: a missing or
empty folder, a single class, a class with too few images to split, and images that cannot be
decoded (reported with their path when the backbone reads them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from hookmix._errors import UsageError

__all__ = ["eval_transform", "FolderSplit", "IMAGENET_MEAN", "IMAGENET_STD", "load_image_folder", "stratified_split"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(input_size: tuple[int, int, int]) -> transforms.Compose:
    """Resize the short side to 8/7 of the crop, centre-crop to (H, W), scale to ImageNet statistics."""
    channels, height, width = input_size
    steps = [transforms.Resize(int(round(min(height, width) * 8 / 7))), transforms.CenterCrop((height, width))]
    if channels == 1:
        steps.append(transforms.Grayscale())
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN[:channels], IMAGENET_STD[:channels])]
    return transforms.Compose(steps)


def _load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"unreadable image {path}: {exc}. Remove or replace the file and run again.") from None


@dataclass(frozen=True)
class FolderSplit:
    """A class-per-folder dataset split into train / validation subsets (stratified)."""

    train: Dataset
    val: Dataset
    classes: tuple[str, ...]
    transform: transforms.Compose


def load_image_folder(
    root: str | Path, input_size: tuple[int, int, int], *, val_fraction: float = 0.2, seed: int = 0
) -> FolderSplit:
    """Read ``root`` (``root/<class>/<image>``) and split each class into train / validation.

    Every class keeps at least one image on each side, so a class needs two images or more.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"--data {root} is not a directory; give a folder with one sub-folder per class.")
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"val_fraction={val_fraction!r} must be in (0, 1), e.g. val_fraction=0.2.")
    if input_size[0] not in (1, 3):
        raise UsageError(
            f"--input-size {' '.join(map(str, input_size))} asks for {input_size[0]} channels, but images are read "
            "as RGB: use C=3 (or 1 for grayscale)."
        )
    transform = eval_transform(input_size)
    try:
        folder = datasets.ImageFolder(root, transform=transform, loader=_load_rgb)
    except FileNotFoundError as exc:
        raise UsageError(
            f"--data {root} holds no images in class sub-folders ({exc}); expected root/<class>/<image>.png."
        ) from None
    if len(folder.classes) < 2:
        raise UsageError(
            f"--data {root} has a single class {folder.classes}; classification needs at least two "
            "sub-folders of images."
        )
    train_idx, val_idx = stratified_split(folder, val_fraction, seed)
    return FolderSplit(Subset(folder, train_idx), Subset(folder, val_idx), tuple(folder.classes), transform)


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
