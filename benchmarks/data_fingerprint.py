"""What the data's identity in a cache key costs: ``dataset_fingerprint`` of an ImageFolder of 10,000 files.

Writes ``--files`` files of ``--bytes`` random bytes each (default 10,000 x 100 KB, a typical JPEG) into
``--classes`` class folders under a temporary directory in ``--dir``, builds the torchvision ``ImageFolder``
once, then times, interleaved over ``--rounds`` rounds (median reported):

* scan   — ``ImageFolder(root)``: the directory walk every run already pays, for scale;
* stat   — ``dataset_fingerprint(folder)``: names, labels, size and mtime of every file (the default);
* sha256 — ``dataset_fingerprint(folder, hash_content=True)``: every byte read and hashed as well, warm
  (pages in the page cache) and, with ``--cold``, after the files' pages were dropped (``posix_fadvise``), as
  on a first run over data not read lately. The directory entries and inodes stay cached (dropping them
  needs the machine-wide ``drop_caches``), so ``stat`` is the warm figure.

    python benchmarks/data_fingerprint.py [--files 10000] [--bytes 100000] [--classes 10] [--rounds 7] [--cold]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from torchvision.datasets import ImageFolder

from _disk import drop_page_cache
from _timing import interleaved_medians
from hookmix.headonly.dataset_identity import dataset_fingerprint


def write_files(root: Path, files: int, size: int, classes: int) -> None:
    """``files`` files of ``size`` random bytes, spread over ``classes`` class folders (``.jpg`` names)."""
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True)
    for i in range(files):
        (root / f"class{i % classes:02d}" / f"{i:06d}.jpg").write_bytes(os.urandom(size))


def timed(fn: Callable[[], object], before: Callable[[], None] = lambda: None) -> Callable[[], float]:
    """A variant for :func:`interleaved_medians`: seconds of one call of ``fn`` (``before`` runs untimed)."""

    def run() -> float:
        before()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--bytes", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dir", default=None, help="where the temporary folder goes (default: the system's)")
    parser.add_argument("--cold", action="store_true", help="also hash after dropping the files' pages")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hookmix-fingerprint-", dir=args.dir))
    try:
        write_files(work / "data", args.files, args.bytes, args.classes)
        folder = ImageFolder(work / "data", loader=lambda path: path)
        variants = {
            "scan": timed(lambda: ImageFolder(work / "data", loader=lambda path: path)),
            "stat": timed(lambda: dataset_fingerprint(folder)),
            "sha256": timed(lambda: dataset_fingerprint(folder, hash_content=True)),
        }
        if args.cold:
            variants["sha256 cold"] = timed(
                lambda: dataset_fingerprint(folder, hash_content=True), lambda: drop_page_cache(work / "data")
            )
        medians = interleaved_medians(variants, args.rounds)
        total = args.files * args.bytes / 1e6
        print(f"{args.files:,} files of {args.bytes:,} B ({total:,.0f} MB), median of {args.rounds} rounds:")
        for name, seconds in medians.items():
            print(f"  {name:12s} {seconds:8.3f} s  ({seconds / args.files * 1e6:6.1f} us/file)")
        print(f"  stat / scan: {medians['stat'] / medians['scan']:.2f}")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
