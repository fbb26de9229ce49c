"""What a dataset *is*, as a short string: the data part of a :class:`hookmix.CacheKey`.

A feature cache is valid only for the rows it was extracted from. A folder path and a row count do not say
that: overwrite an image, or move one to another class folder, and both stay the same while the features
do not. :func:`dataset_fingerprint` hashes, row by row and in row order (so the split and the order are
covered too):

* image files (torchvision ``ImageFolder`` / ``DatasetFolder``, and :func:`files_fingerprint` for any list
  of files): each file's name relative to the folder all the files share, its label (the class name, not
  an index that depends on the other classes), its size and its modification time in nanoseconds — or,
  with ``hash_content=True``, also the sha256 of its bytes;
* in-memory tensors (``TensorDataset``, :func:`tensors_fingerprint`): every tensor's dtype, shape and bytes;
* ``Subset`` s of either: the rows they select, in their order.

Size + mtime is what ``make`` and ``git`` trust: any write through the file system moves the mtime, and it
costs one ``stat`` per file (``benchmarks/data_fingerprint.py``, 10,000 files on a busy 2-core machine: median
0.13 s, against 0.03 s for ``ImageFolder`` to list them). It misses a file replaced by another of the same size
*and* the same mtime (``cp -p``, ``rsync -t`` of another version), and sees a ``touch`` as a change (a needless
re-extraction, never a stale one). ``hash_content`` closes the first gap by reading every byte, 16-30x the cost
(the same 10,000 files of 100 KB: 2.1 s from the page cache, 4.0 s from disk) paid on every run, reuse
included, so it is an option and not the default. The folder's own path is not part of the identity: a moved
folder (same names, same files) is the same data.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from hookmix.core.errors import UsageError

__all__ = ["dataset_fingerprint", "files_fingerprint", "tensors_fingerprint"]

_CHUNK = 2**20
"""Bytes read at a time when a file's content is hashed."""


def _content_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def files_fingerprint(rows: Iterable[tuple[str | os.PathLike[str], str]], *, hash_content: bool = False) -> str:
    """The identity of a list of labelled files, in row order: ``"files:<n>:<mode>:<16 hex digits>"``.

    Args:
        rows: ``(path, label)`` per row; the label is any string that says what the row is labelled with
            (a class name, or the sorted label names of a multi-label row joined by ``;``).
        hash_content: also hash every file's bytes (mode ``sha256``), not only its size and mtime (``stat``).

    Names enter relative to the folder all the files share, so moving that folder changes nothing. A file
    that cannot be read is a :class:`hookmix.UsageError` naming it.
    """
    rows = [(os.path.abspath(path), label) for path, label in rows]
    if not rows:
        raise UsageError("files_fingerprint got no rows; a dataset needs at least one file.")
    common = os.path.commonpath([os.path.dirname(path) for path, _ in rows])
    skip = len(os.path.join(common, ""))  # names relative to the shared folder, by slicing (relpath is slow)
    lines = []
    for path, label in rows:
        try:
            stat = os.stat(path)
            content = _content_sha256(path) if hash_content else ""
        except OSError as exc:
            raise UsageError(f"cannot read {path} to fingerprint the data ({exc}); restore or remove it.") from None
        name = path[skip:].replace(os.sep, "/")
        lines.append(repr((name, label, stat.st_size, stat.st_mtime_ns, content)))
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    return f"files:{len(rows)}:{'sha256' if hash_content else 'stat'}:{digest}"


def tensors_fingerprint(*tensors: torch.Tensor) -> str:
    """The identity of in-memory data: ``"tensors:<rows>:<16 hex digits>"`` over every tensor's dtype, shape
    and bytes (``rows``: the first tensor's length)."""
    if not tensors or not all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in tensors):
        raise UsageError(f"tensors_fingerprint needs one or more tensors with a row dimension, got {tensors!r}.")
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().cpu().contiguous()
        digest.update(f"{flat.dtype}{tuple(flat.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return f"tensors:{len(tensors[0])}:{digest.hexdigest()[:16]}"


def _rows_of(dataset: Dataset) -> tuple[Dataset, list[int] | None]:
    """The dataset under any ``Subset`` wrappers and the indices of its rows they select (``None``: all)."""
    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        chosen = [int(i) for i in dataset.indices]
        indices = chosen if indices is None else [chosen[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


def dataset_fingerprint(dataset: Dataset, *, hash_content: bool = False) -> str:
    """The identity of ``dataset``'s rows, for ``CacheKey(dataset=...)``: see the module for what it covers.

    Knows torchvision's ``DatasetFolder`` / ``ImageFolder``, ``TensorDataset`` and ``Subset`` s of them.
    Another dataset is a ``TypeError``: build its identity with :func:`files_fingerprint` (the files and
    labels of its rows) or :func:`tensors_fingerprint`.
    """
    from torchvision.datasets import DatasetFolder  # torchvision is a dependency; imported when first needed

    base, indices = _rows_of(dataset)
    if isinstance(base, TensorDataset):
        index = None if indices is None else torch.tensor(indices, dtype=torch.int64)
        return tensors_fingerprint(*(t if index is None else t[index] for t in base.tensors))
    if isinstance(base, DatasetFolder):
        samples = base.samples if indices is None else [base.samples[i] for i in indices]
        return files_fingerprint([(path, base.classes[target]) for path, target in samples], hash_content=hash_content)
    raise TypeError(
        f"dataset_fingerprint does not know {type(base).__name__}; pass files_fingerprint([(path, label), ...]) "
        "of its rows (or tensors_fingerprint of its tensors) as CacheKey(dataset=...)."
    )
