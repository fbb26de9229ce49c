"""Multi-label image data for ``hookmix finetune --labels CSV --data ROOT``: one CSV row per image.

The CSV has a header with the columns ``path`` and ``labels`` (others are ignored). ``path`` is relative
to ROOT or absolute; ``labels`` lists the image's labels separated by ``;`` (whitespace around a label
is dropped) and may be empty: an image with no positive label. A quoted field may hold commas.

Bad inputs, each a one-line :class:`hookmix.UsageError` naming the file, the line and the fix,
or a reported skip:

* a missing or empty CSV, or a header without ``path`` or ``labels`` (the columns found are listed);
* a row without a path, or with fewer fields than the header;
* the same image on two rows (an error naming both lines: two label sets for one image are
  ambiguous, so they are not merged silently), or in both the training and the validation CSV;
* image paths that do not exist: an error listing the first few with their lines (usually ROOT is
  wrong, and training on what is left would silently drop data);
* images that exist but cannot be read (not an image, truncated): skipped, and listed in
  :attr:`LabelsSplit.skipped` for the caller to report, so one bad file in a large CSV does not end a
  run halfway. Every image is opened and verified (``PIL.Image.verify``) up front for this, its size
  checked against PIL's decompression-bomb limit and its pixel mode against those hookmix reads
  (:func:`~hookmix.app.imagefolder.image_problem`); a file that still fails to decode later raises a
  :class:`hookmix.UsageError` naming it;
* a label of the validation CSV that no training row has: an error naming it and its line (the head
  has no output for it).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from hookmix.app.imagefolder import check_image_args, load_rgb
from hookmix.app.preprocessing import Preprocessing, default_preprocessing
from hookmix.core.errors import UsageError
from hookmix.headonly.images import image_problem

__all__ = ["LabelRow", "LabeledImages", "LabelsSplit", "load_labels_csv", "read_labels_csv", "LABEL_SEPARATOR"]

LABEL_SEPARATOR = ";"
_COLUMNS = ("path", "labels")
_SHOWN = 3
"""How many offending rows an error message lists."""


@dataclass(frozen=True)
class LabelRow:
    """One CSV row: the image's resolved ``path``, its ``labels`` and where it came from (``source`` line ``line``)."""

    path: Path
    labels: tuple[str, ...]
    source: str
    line: int

    @property
    def where(self) -> str:
        """``"<source> line <line>"``, for messages."""
        return f"{self.source} line {self.line}"


class LabeledImages(Dataset):
    """Images with multi-hot targets: item ``i`` is ``(x (C, H, W) float, y (L,) float32)``.

    ``targets`` ``(N, L)`` holds every row's multi-hot target over ``classes`` (column ``j`` is
    ``classes[j]``); ``paths`` the image files, read as RGB with PIL and passed through ``transform``.
    """

    def __init__(self, rows: Sequence[LabelRow], classes: tuple[str, ...], transform: Callable[[Any], Any]) -> None:
        column = {name: j for j, name in enumerate(classes)}
        self.classes = classes
        self.paths = [str(row.path) for row in rows]
        self.targets = torch.zeros(len(rows), len(classes))
        for i, row in enumerate(rows):
            self.targets[i, [column[label] for label in row.labels]] = 1.0
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(load_rgb(self.paths[index])), self.targets[index]


@dataclass(frozen=True)
class LabelsSplit:
    """Multi-label training / validation data, the classes (sorted label names: the head's outputs) and the
    images skipped as unreadable, one ``"<csv> line <n>: <path> (<reason>)"`` each."""

    train: LabeledImages
    val: LabeledImages
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    augmented: bool
    skipped: tuple[str, ...]


def _open_csv(csv_path: Path, flag: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """The header and the ``(line, row)`` pairs of ``csv_path``."""
    if not csv_path.is_file():
        problem = "is a directory" if csv_path.is_dir() else "does not exist"
        raise UsageError(f"{flag} {csv_path} {problem}; give a CSV file with the columns path,labels.")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(
            f"{flag} {csv_path} cannot be read as a UTF-8 CSV file ({exc}); save it as CSV (UTF-8)."
        ) from None
    if not header:
        raise UsageError(f"{flag} {csv_path} is empty; its first line must be the header path,labels.")
    missing = [name for name in _COLUMNS if name not in header]
    if missing:
        raise UsageError(
            f"{flag} {csv_path} line 1: the header has the columns {header} but not {missing}; name the image "
            "column path and the label column labels (labels separated by ';')."
        )
    if not rows:
        raise UsageError(f"{flag} {csv_path} has a header but no rows; add one row per image: path,labels.")
    return header, rows


def read_labels_csv(csv_path: str | Path, root: str | Path, flag: str = "--labels") -> list[LabelRow]:
    """The rows of a labels CSV, paths resolved against ``root`` (``--data``); errors for a missing file or
    column, a row without a path or with too few fields, the same image on two rows, and images that do
    not exist (the first few listed). ``flag`` names the CSV's option in messages."""
    csv_path, root = Path(csv_path), Path(root)
    header, raw_rows = _open_csv(csv_path, flag)
    rows: list[LabelRow] = []
    first_line: dict[Path, int] = {}
    for line, raw in raw_rows:
        where = f"{flag} {csv_path} line {line}"
        if raw["labels"] is None:
            raise UsageError(
                f"{where} has fewer fields than the header {header}; write 'image.png,' for an image without labels."
            )
        if not (raw["path"] or "").strip():
            raise UsageError(f"{where} has an empty path; give the image's path relative to --data {root}.")
        path = (root / raw["path"].strip()).resolve()
        if path in first_line:
            raise UsageError(
                f"{where} lists {raw['path'].strip()} again (first on line {first_line[path]}); keep one row per "
                "image, with all its labels joined by ';'."
            )
        first_line[path] = line
        labels = tuple(dict.fromkeys(part.strip() for part in raw["labels"].split(LABEL_SEPARATOR) if part.strip()))
        rows.append(LabelRow(path, labels, f"{flag} {csv_path}", line))
    absent = [row for row in rows if not row.path.is_file()]
    if absent:
        shown = ", ".join(f"line {row.line}: {row.path}" for row in absent[:_SHOWN])
        raise UsageError(
            f"{flag} {csv_path}: {len(absent)} of {len(rows)} image paths do not exist ({shown}"
            f"{', ...' if len(absent) > _SHOWN else ''}); paths are relative to --data {root} or absolute."
        )
    return rows


def _readable(rows: list[LabelRow], progress: bool) -> tuple[list[LabelRow], list[str]]:
    """The rows whose image opens and verifies, and a note for each skipped one."""
    kept, skipped = [], []
    for row in tqdm(rows, desc="check images", disable=not progress):
        reason = image_problem(row.path, verify=True)
        if reason is None:
            kept.append(row)
        else:
            skipped.append(f"{row.where}: {row.path} ({reason})")
    return kept, skipped


def _split(rows: list[LabelRow], val_fraction: float, seed: int) -> tuple[list[LabelRow], list[LabelRow]]:
    """A seeded random split of ``rows``; a validation row with a label no training row has moves to
    training (so a label seen on one row only is always trained on)."""
    if len(rows) < 2:
        raise UsageError(
            f"{rows[0].source} has {len(rows)} readable image; splitting off validation needs at least 2, "
            "or give a validation CSV."
        )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(max(1, round(len(rows) * val_fraction)), len(rows) - 1)
    train_idx, val_idx = set(order[n_val:]), []
    seen = {label for i in train_idx for label in rows[i].labels}
    for i in order[:n_val]:
        if set(rows[i].labels) <= seen:
            val_idx.append(i)
        else:
            train_idx.add(i)
            seen.update(rows[i].labels)
    if not val_idx:
        raise UsageError(
            f"{rows[0].source}: every validation row has a label that no other row has, so no validation rows "
            "remain; add examples or give a validation CSV."
        )
    return [rows[i] for i in sorted(train_idx)], [rows[i] for i in sorted(val_idx)]


def _check_disjoint_and_known(train: list[LabelRow], val: list[LabelRow], classes: tuple[str, ...]) -> None:
    train_lines = {row.path: row for row in train}
    for row in val:
        if row.path in train_lines:
            raise UsageError(
                f"{row.where} lists {row.path}, which {train_lines[row.path].where} already has; validation "
                "images must not be training images: remove it from one of the CSVs."
            )
        unknown = [label for label in row.labels if label not in classes]
        if unknown:
            raise UsageError(
                f"{row.where} has the label {unknown[0]!r}, which no training row of {train[0].source} has, so the "
                "head has no output for it; add training examples with it or remove it from the validation CSV."
            )


def load_labels_csv(
    labels: str | Path,
    root: str | Path,
    input_size: tuple[int, int, int],
    *,
    preprocessing: Preprocessing | None = None,
    val_labels: str | Path | None = None,
    augment: bool = False,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = False,
) -> LabelsSplit:
    """Read the labels CSV ``labels`` of images under ``root`` into training and validation data.

    Args:
        labels: the training CSV (``--labels``), columns ``path`` and ``labels`` (see the module).
        root: the folder the CSV paths are relative to (``--data``), for ``val_labels`` too.
        input_size: (C, H, W) of one model input (C = 1 reads images as grayscale).
        preprocessing: the model's (:mod:`hookmix.app.preprocessing`); ImageNet defaults when ``None``.
        val_labels: a validation CSV of the same form; without it the rows of ``labels`` are split at
            random (seeded by ``seed``), ``val_fraction`` of them for validation, except that a row with
            a label no training row has stays in training.
        augment: read training images with the model's training transform; validation images always
            get the evaluation transform.
        progress: show a progress bar while every image is checked.

    The classes are the sorted labels of the training rows; each dataset yields ``(x, y)`` with ``y`` the
    ``(len(classes),)`` float multi-hot target. Unreadable images are skipped and listed in ``skipped``.
    """
    check_image_args(input_size, val_fraction)
    train_rows, skipped = _readable(read_labels_csv(labels, root, "--labels"), progress)
    if val_labels is None:
        if not train_rows:
            raise UsageError(f"--labels {labels}: no image could be read ({skipped[0]}, ...).")
        train_rows, val_rows = _split(train_rows, val_fraction, seed)
    else:
        val_rows, val_skipped = _readable(read_labels_csv(val_labels, root, "--val-labels"), progress)
        skipped += val_skipped
        for rows, flag, path in ((train_rows, "--labels", labels), (val_rows, "--val-labels", val_labels)):
            if not rows:
                raise UsageError(f"{flag} {path}: no image could be read ({skipped[0]}, ...).")
    classes = tuple(sorted({label for row in train_rows for label in row.labels}))
    if not classes:
        raise UsageError(
            f"--labels {labels}: no training row has a label (every labels field is empty); nothing to learn."
        )
    _check_disjoint_and_known(train_rows, val_rows, classes)
    preprocessing = (preprocessing or default_preprocessing()).with_input_size(input_size)
    evaluation = preprocessing.eval_transform()
    return LabelsSplit(
        train=LabeledImages(train_rows, classes, preprocessing.train_transform() if augment else evaluation),
        val=LabeledImages(val_rows, classes, evaluation),
        classes=classes,
        preprocessing=preprocessing,
        augmented=augment,
        skipped=tuple(skipped),
    )
