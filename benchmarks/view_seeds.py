"""What seeding every ``(row, view)`` costs an extraction's data loading (:mod:`hookmix.headonly.view_seeds`).

The DataLoader of :func:`hookmix.headonly._backbone_pass.run_backbone` reads ``SeededViews(dataset)``, which seeds
torch's CPU generator, Python's ``random`` and numpy's before every item and saves / restores their states once per
batch. Timed in interleaved rounds, in the main process (``num_workers=0``), batches of ``--batch-size``:

- trivial: a ``TensorDataset`` of ``--n`` tiny rows, the worst case (an item costs next to nothing), read plainly
  and through ``SeededViews``;
- augmented: ``--n-augmented`` 3x64x64 images through ``RandomResizedCrop(56)`` + ``RandomHorizontalFlip``, a
  cheap real augmentation (decoding a JPEG costs more), read plainly and through ``SeededViews``.

Prints the medians, the overhead per item in µs and the seeded / plain ratio of each.

    OMP_NUM_THREADS=1 python benchmarks/view_seeds.py [--n 20000] [--n-augmented 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians  # noqa: E402
from hookmix.headonly.view_seeds import SeededViews  # noqa: E402


class Augmented(Dataset):
    """Generated 3x64x64 images read through a random crop to 56 and a flip."""

    def __init__(self, n: int) -> None:
        self.images = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        self.augment = transforms.Compose(
            [transforms.RandomResizedCrop(56, antialias=True), transforms.RandomHorizontalFlip()]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.augment(self.images[index]), index % 10


def reader(dataset: Dataset, n: int, batch_size: int, seeded: bool) -> Callable[[], float]:
    """Seconds to read all ``n`` rows once in batches, plainly or as view 0 through ``SeededViews``."""
    batches = [list(range(b, min(b + batch_size, n))) for b in range(0, n, batch_size)]
    source: Dataset = SeededViews(dataset, n) if seeded else dataset
    sampler = [[(row, 0) for row in batch] for batch in batches] if seeded else batches

    def read() -> float:
        start = time.perf_counter()
        for _ in DataLoader(source, batch_sampler=sampler, generator=torch.Generator().manual_seed(0)):
            pass
        return time.perf_counter() - start

    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="rows of the trivial dataset")
    parser.add_argument("--n-augmented", type=int, default=2000, help="rows of the augmented dataset")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trivial = TensorDataset(torch.rand(args.n, 8), torch.arange(args.n))
    sets = {"trivial": (trivial, args.n), "augmented": (Augmented(args.n_augmented), args.n_augmented)}
    variants = {
        f"{name} {how}": reader(dataset, n, args.batch_size, how == "seeded")
        for name, (dataset, n) in sets.items()
        for how in ("plain", "seeded")
    }
    medians = interleaved_medians(variants, args.rounds)
    for name, (_, n) in sets.items():
        plain, seeded = medians[f"{name} plain"], medians[f"{name} seeded"]
        print(
            f"{name}: plain {n / plain:,.0f} items/s, seeded {n / seeded:,.0f} items/s; "
            f"overhead {(seeded - plain) / n * 1e6:.1f} µs per item, seeded / plain = {seeded / plain:.3f}"
        )


if __name__ == "__main__":
    main()
