"""The identity of the data ``hookmix finetune`` caches features of, for its :class:`hookmix.CacheKey`.

Image folders (a ``Subset`` of an ``ImageFolder`` per part, or a ``--val`` folder) and the embedded digits
task (``TensorDataset``) are the library's :func:`~hookmix.headonly.dataset_identity.dataset_fingerprint`; the rows of
a labels CSV (:class:`~hookmix.app.labels_csv.LabeledImages`) enter as their files and label sets. Each part
(train, val) is fingerprinted on its own rows, so which rows are training and which validation is covered.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from hookmix.app.labels_csv import LABEL_SEPARATOR, LabeledImages
from hookmix.headonly.dataset_identity import dataset_fingerprint, files_fingerprint

__all__ = ["data_identity"]


def _label_set(target: list[float], classes: tuple[str, ...]) -> str:
    return LABEL_SEPARATOR.join(name for name, value in zip(classes, target) if value)


def data_identity(dataset: Dataset) -> str:
    """A short string that changes when a row's file (name, size, mtime), label or place in the part does."""
    if isinstance(dataset, LabeledImages):
        targets = dataset.targets.tolist()
        rows = [(path, _label_set(target, dataset.classes)) for path, target in zip(dataset.paths, targets)]
        return files_fingerprint(rows)
    return dataset_fingerprint(dataset)
