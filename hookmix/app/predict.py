"""``hookmix predict``: classify image files with a fine-tuned run, one CSV row per image.

The run is rebuilt exactly by the library's loader (:func:`hookmix.app.run.load_run`, a run directory or an
exported file: the run's model and weights, layer, head, preprocessing, temperature and thresholds), and the
images are classified by :meth:`hookmix.FinetunedModel.predict`, so ``hookmix predict`` and
``hookmix.load_finetuned(run).predict(paths)`` give the same numbers. Inputs are image files and folders
(searched recursively, in sorted order). What the app adds: an image that cannot be read is reported on
standard error and skipped (the others are still classified), a progress bar, the device, and the CSV. A path
that does not exist, a folder without images, or nothing readable at all is a one-line error.

Each row holds the path, the ``top_k`` classes with their probabilities (after the temperature, 6 decimals),
and for a multi-label run the predicted label set (each label at its own threshold, in class order),
``;``-separated.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Callable, Sequence, TextIO

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm.auto import tqdm

from hookmix.app.paths import writable_file
from hookmix.app.run import load_run
from hookmix.core.devices import resolve_device
from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write
from hookmix.headonly.images import UnreadableImage, read_rgb
from hookmix.headonly.trained_model import FinetunedModel

__all__ = ["collect_images", "predict_images", "write_predictions"]


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders searched recursively (sorted)."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            images = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            if not images:
                raise UsageError(f"{item} holds no images ({', '.join(IMG_EXTENSIONS)}); give image files or folders.")
            found.extend(images)
        elif item.is_file():
            found.append(item)
        else:
            raise UsageError(f"{item} does not exist; give image files or folders.")
    return found


def _read(path: Path, warn: Callable[[str], None]) -> Image.Image | None:
    """``path`` read as the run's training images were (:func:`~hookmix.headonly.images.read_rgb`); ``None``,
    reported to ``warn``, when it cannot be read."""
    try:
        return read_rgb(path)
    except UnreadableImage as exc:
        warn(f"hookmix: skipped {path}: not a readable image ({exc})")
        return None


def predict_images(
    model: FinetunedModel,
    paths: Sequence[Path],
    *,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> list[tuple[Path, torch.Tensor, tuple[str, ...]]]:
    """``(path, probabilities (C,), predicted class names)`` of each readable image, in order
    (:meth:`FinetunedModel.predict`); unreadable ones are reported to ``warn`` and left out."""
    model.to(resolve_device(device))
    results: list[tuple[Path, torch.Tensor, tuple[str, ...]]] = []
    with tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            loaded = [(p, image) for p in chunk if (image := _read(p, warn)) is not None]
            if loaded:
                found = model.predict([image for _, image in loaded], batch_size=batch_size)
                results.extend(zip((p for p, _ in loaded), found.probabilities, found.predicted))
            bar.update(len(chunk))
    if not results:
        raise UsageError(f"none of the {len(paths)} inputs is a readable image; nothing to predict.")
    return results


def write_predictions(
    model: FinetunedModel, results: Sequence[tuple[Path, torch.Tensor, tuple[str, ...]]], top_k: int, out: TextIO
) -> None:
    """The CSV: ``path, class_1, prob_1, ..., class_k, prob_k`` (+ ``predicted`` for multi-label runs)."""
    classes = model.config.classes
    k = min(top_k, len(classes))
    multilabel = model.config.task == "multilabel"
    header = ["path"] + [f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "prob")]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header + (["predicted"] if multilabel else []))
    for path, probabilities, predicted in results:
        values, indices = probabilities.topk(k)
        row = [str(path)] + [v for value, index in zip(values, indices) for v in (classes[index], f"{value:.6f}")]
        writer.writerow(row + ([";".join(predicted)] if multilabel else []))


def run_predict(
    run: str | Path,
    inputs: Sequence[str | Path],
    out: Path | None,
    *,
    top_k: int = 5,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
) -> int:
    """Rebuild ``run``, classify ``inputs`` and write the CSV to ``out`` (standard output when ``None``);
    returns the number of rows. ``out`` and the inputs are checked first, so an unwritable ``--out`` is
    one line before the work; the CSV is written whole (atomically) after the last image."""
    if out is not None:
        writable_file("--out", out, "predictions.csv")
    paths = collect_images(inputs)
    model = load_run(run).model
    results = predict_images(model, paths, batch_size=batch_size, device=device, progress=progress)
    text = io.StringIO()
    write_predictions(model, results, top_k, text)
    if out is None:
        sys.stdout.write(text.getvalue())
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, text.getvalue().encode())
    return len(results)
