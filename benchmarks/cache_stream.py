"""A feature cache larger than memory: one streamed training epoch against a plain read of the same files.

Writes a synthetic cache of ``--rows`` x (2048, 7, 7) float16 features (30,000 rows: 6.0 GB) with
``FeatureCache.extract`` (a 1x1 convolution from (8, 7, 7) inputs to 2048 channels is the backbone), in a
temporary directory under ``--dir``, then measures, each in a fresh process so that no phase's memory counts
in another's:

* plain  — a sequential read of every shard file, in order, into one reused 16 MiB buffer;
* epoch  — ``FeatureCache.load(path, key, mmap=True)`` and one epoch of ``fit`` on it: a pooled linear head
  (AdaptiveAvgPool2d + Linear(2048, 10)), batches of ``--batch``, blocks of ``--block-shards`` shards read
  by the background thread (each shard's sha256 checked as it is read), validation on 256 in-memory rows.

With ``--in-memory`` the same epoch also runs on the cache loaded whole (``mmap=False``, same block order:
the same loss; on a GPU it says whether the losses are equal), which splits the epoch's time into training
compute and streaming. On CUDA the device is started (context, cuBLAS) before an epoch's clock starts, and the
epoch's peak GPU memory is printed with the card's name. Every read starts cold:
the shard files' pages are dropped from the page cache first (``posix_fadvise DONTNEED`` after an fsync: no
root needed), so each reads from the disk, as an epoch over a cache larger than RAM does. Prints the peak
RSS of the epoch's process (goal <= 2 GB) and the epoch time over the plain read time (goal <= 1.25), and
removes the cache.

    python benchmarks/cache_stream.py [--rows 30000] [--shard-size 512] [--block-shards 2 [4 ...]] [--batch 256]
        [--device cpu|cuda] [--in-memory]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from _disk import GB, drop_page_cache, peak_rss, read_shards
from hookmix import CacheKey, FeatureCache, FitConfig, fit

FEATURES = (2048, 7, 7)
CLASSES = 10
KEY = CacheKey("benchmark:conv1x1-2048", "conv", (8, 7, 7), "none", "synthetic")


class Synthetic(Dataset):
    """Row i: an (8, 7, 7) input whose mean depends on its class, the same on every call (seeded by i)."""

    def __init__(self, rows: int, offset: int = 0) -> None:
        self.rows, self.offset = rows, offset

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.offset + index)
        label = torch.randint(CLASSES, (), generator=gen)
        return torch.randn(8, 7, 7, generator=gen) + 0.3 * label, label


def backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(8, FEATURES[0], 1)


def head() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(FEATURES[0], CLASSES))


def phase_write(directory: Path, rows: int, shard_size: int, device: str) -> dict[str, float]:
    start = time.perf_counter()
    FeatureCache.extract(
        backbone(),
        Synthetic(rows),
        KEY,
        path=directory,
        shard_size=shard_size,
        batch_size=256,
        num_workers=2,
        device=device,
        mmap=True,
    )
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss()}


def phase_read(directory: Path) -> dict[str, float]:
    seconds, total = read_shards(directory)
    return {"seconds": seconds, "bytes": total, "peak_rss_gb": peak_rss()}


def warm(device: torch.device) -> None:
    """Start CUDA (its context, cuBLAS, the allocator) before the clock: the figure is an epoch's time, not the
    process's first use of the GPU."""
    if device.type == "cuda":
        head().to(device)(torch.zeros(2, *FEATURES, device=device)).sum().backward()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def phase_epoch(directory: Path, block_shards: int, batch: int, device: str, mmap: bool) -> dict[str, float]:
    """One epoch of ``fit`` on the cache, memory-mapped (``mmap``) or loaded whole, in the same block order."""
    val = FeatureCache.extract(backbone(), Synthetic(256, offset=10**9), KEY, progress=False)
    warm(torch.device(device))
    start = time.perf_counter()
    cache = FeatureCache.load(directory, KEY, mmap=True)
    layout = cache.features.layout(block_shards)
    if not mmap:
        cache = FeatureCache.load(directory, KEY)
    loaded = time.perf_counter()
    config = FitConfig(epochs=1, batch_size=batch, lr=1e-3, seed=0)
    result = fit(
        head(),
        "input",
        cache.features,
        cache.labels,
        val.features[0],
        val.labels,
        config,
        num_classes=CLASSES,
        blocks=layout,
        device=device,
        progress=False,
    )
    end = time.perf_counter()
    return {
        "seconds": end - start,
        "load_seconds": loaded - start,
        "fit_seconds": end - loaded,
        "peak_rss_gb": peak_rss(),
        "gpu_peak_gb": torch.cuda.max_memory_allocated() / GB if torch.device(device).type == "cuda" else 0.0,
        "train_loss": result.final["train_loss"],
    }


def in_fresh_process(phase: str, **arguments: object) -> dict[str, float]:
    command = [sys.executable, __file__, "--phase", phase, "--args", json.dumps(arguments)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--block-shards", type=int, nargs="+", default=[2], help="one streamed epoch for each")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--device", default="cpu", help="where the extraction and the head run")
    parser.add_argument("--in-memory", action="store_true", help="also train on the cache loaded whole (RAM!)")
    parser.add_argument("--phase", choices=["write", "read", "epoch"], help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: not measured on a GPU")
        return
    if args.phase:
        phases = {"write": phase_write, "read": phase_read, "epoch": phase_epoch}
        options = json.loads(args.args)
        print(json.dumps(phases[args.phase](Path(options.pop("directory")), **options)))
        return
    directory = Path(tempfile.mkdtemp(prefix="hookmix-cache-stream-", dir=args.dir))
    try:
        common = {"directory": str(directory), "device": args.device}
        written = in_fresh_process("write", **common, rows=args.rows, shard_size=args.shard_size)
        size = sum(p.stat().st_size for p in directory.glob("shard-*"))
        shards = len(list(directory.glob("shard-*")))
        print(
            f"cache: {args.rows} x {FEATURES} float16, {shards} shards of {args.shard_size} rows, {size / GB:.2f} GB; "
            f"extracted in {written['seconds']:.1f} s, peak RSS of the extraction {written['peak_rss_gb']:.2f} GB"
        )
        drop_page_cache(directory)
        plain = in_fresh_process("read", directory=str(directory))
        print(
            f"plain sequential read (cold): {plain['seconds']:.2f} s, {plain['bytes'] / GB / plain['seconds']:.2f} GB/s"
        )
        if torch.device(args.device).type == "cuda":
            print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        for block_shards in args.block_shards:
            drop_page_cache(directory)
            run = {**common, "block_shards": block_shards, "batch": args.batch}
            epoch = in_fresh_process("epoch", **run, mmap=True)
            block_gb = block_shards * size / shards / GB
            print(
                f"streamed epoch on {args.device} (cold, blocks of {block_shards} shards = {block_gb:.2f} GB, batch "
                f"{args.batch}): {epoch['seconds']:.2f} s (open {epoch['load_seconds']:.2f} s + fit "
                f"{epoch['fit_seconds']:.2f} s), peak RSS {epoch['peak_rss_gb']:.2f} GB, loss {epoch['train_loss']:.6f}"
            )
            rss, ratio = epoch["peak_rss_gb"], epoch["seconds"] / plain["seconds"]
            print(f"  peak RSS of the epoch: {rss:.2f} GB = {rss / 2:.2f} x the 2 GB goal")
            if epoch["gpu_peak_gb"]:
                print(f"  peak GPU memory of the epoch: {epoch['gpu_peak_gb']:.2f} GB")
            print(f"  epoch time / plain read time: {ratio:.2f} (goal <= 1.25)")
        if args.in_memory:
            drop_page_cache(directory)
            whole = in_fresh_process("epoch", **run, mmap=False)
            print(
                f"in-memory epoch, blocks of {block_shards} shards (cold): {whole['seconds']:.2f} s (load "
                f"{whole['load_seconds']:.2f} s + fit {whole['fit_seconds']:.2f} s), peak RSS "
                f"{whole['peak_rss_gb']:.2f} GB, loss {whole['train_loss']:.6f}; streamed fit / in-memory fit: "
                f"{epoch['fit_seconds'] / whole['fit_seconds']:.2f}"
            )
            print(f"  streamed loss == in-memory loss: {epoch['train_loss'] == whole['train_loss']}")
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
