"""Storage for a feature cache larger than memory: hookmix's memory-mapped safetensors shards against litdata.

The same synthetic features — ``--rows`` x (2048, 7, 7) float16 and an int64 label per row, generated chunk by
chunk from a seeded generator — are written by each backend, then read for one epoch of shuffled batches
(``--batch`` rows), each step in a fresh process so that no phase's memory counts in another's:

* ``hookmix``  — ``FeatureCache`` shards (safetensors, sha256 in the manifest) written by the extraction's
  shard writer; the epoch reads shuffled blocks of ``--block-shards`` shards through the memory-mapped
  block reader that ``fit`` uses (each shard's checksum verified as it is read, one block prefetched);
* ``litdata``  — Lightning's ``litdata.optimize`` (one item per row: the (2048, 7, 7) array and its label,
  ``--chunk-mb`` chunks) and ``StreamingDataset(shuffle=True)`` + ``StreamingDataLoader`` (its own
  chunk-interval shuffle), ``--workers`` loader workers;
* ``plain``    — a sequential read of the hookmix shard files into one reused buffer, for scale.

Every epoch starts cold: the files are dropped from the page cache first (``posix_fadvise DONTNEED``).
Prints one table (write seconds, epoch seconds, epoch GB/s, peak RSS, bytes on disk) and what each backend
offers for a cache on object storage read by several DDP ranks. litdata is not a hookmix dependency: put it on
``PYTHONPATH`` (``pip install --target DIR litdata boto3``) to run this script.

    PYTHONPATH=/tmp/stor_litdata python benchmarks/cache_storage_compare.py [--rows 8000]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _disk import GB, drop_page_cache, peak_rss, read_shards

FEATURES = (2048, 7, 7)
CHUNK_ROWS = 512


def chunk(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``start..stop``: features (n, 2048, 7, 7) float16 and labels (n,) int64, seeded by ``start``."""
    gen = torch.Generator().manual_seed(start)
    return torch.randn(stop - start, *FEATURES, generator=gen).half(), torch.randint(10, (stop - start,), generator=gen)


def ranges(rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + CHUNK_ROWS, rows)) for start in range(0, rows, CHUNK_ROWS)]


def write_hookmix(directory: Path, rows: int, **_: object) -> dict[str, float]:
    from hookmix.headonly._cache_format import ShardWriter
    from hookmix.headonly.cache import CacheKey

    key = CacheKey("benchmark", "layer4", (3, 224, 224), "none")
    writer = ShardWriter(directory, key, torch.float16, 1, rows, None)
    start = time.perf_counter()
    for first, last in ranges(rows):
        features, labels = chunk(first, last)
        writer(first, last, features.unsqueeze(0), labels)
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss()}


def _litdata_rows(start_stop: tuple[int, int]):  # one item per row, as a streaming dataset stores them
    features, labels = chunk(*start_stop)
    for x, y in zip(features.numpy(), labels.tolist()):
        yield {"x": x, "y": y}


def write_litdata(directory: Path, rows: int, chunk_mb: int, **_: object) -> dict[str, float]:
    from litdata import optimize

    start = time.perf_counter()
    optimize(
        fn=_litdata_rows,
        inputs=ranges(rows),
        output_dir=str(directory),
        chunk_bytes=f"{chunk_mb}MB",
        num_workers=1,
        mode="overwrite",
    )
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss()}


def epoch_hookmix(directory: Path, batch: int, block_shards: int, **_: object) -> dict[str, float]:
    from hookmix.headonly.cache import CacheKey, FeatureCache

    start = time.perf_counter()
    cache = FeatureCache.load(directory, CacheKey("benchmark", "layer4", (3, 224, 224), "none"), mmap=True)
    gen = torch.Generator().manual_seed(0)
    plan = cache.features.layout(block_shards).order(gen)
    view = torch.zeros(len(cache), dtype=torch.int64)
    rows, checksum = 0, 0.0
    for x in cache.features.batches(plan, view, batch):
        rows += len(x)
        checksum += float(x[:, 0, 0, 0].float().sum())  # touch every batch
    return {"seconds": time.perf_counter() - start, "rows": rows, "peak_rss_gb": peak_rss()}


def epoch_litdata(directory: Path, batch: int, workers: int, **_: object) -> dict[str, float]:
    from litdata import StreamingDataLoader, StreamingDataset

    start = time.perf_counter()
    dataset = StreamingDataset(str(directory), shuffle=True, seed=0)
    loader = StreamingDataLoader(dataset, batch_size=batch, num_workers=workers)
    rows, checksum = 0, 0.0
    for item in loader:
        rows += len(item["y"])
        checksum += float(item["x"][:, 0, 0, 0].float().sum())
    seconds = time.perf_counter() - start
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GB
    return {"seconds": seconds, "rows": rows, "peak_rss_gb": max(peak_rss(), children)}


def epoch_plain(directory: Path, **_: object) -> dict[str, float]:
    seconds, _ = read_shards(directory)
    return {"seconds": seconds, "rows": 0, "peak_rss_gb": peak_rss()}


PHASES = {
    "write_hookmix": write_hookmix,
    "write_litdata": write_litdata,
    "epoch_hookmix": epoch_hookmix,
    "epoch_litdata": epoch_litdata,
    "epoch_plain": epoch_plain,
}

OBJECT_STORAGE_AND_DDP = {
    "hookmix": "local / shared file system; shards are immutable files with a sha256 each, so copying them from "
    "object storage is verifiable, but hookmix has no object-store reader; DDP ranks share one cache dir",
    "litdata": "reads s3:// gs:// azure:// directly with a bounded local chunk cache; splits chunks across DDP "
    "ranks and loader workers by itself (each rank its own part); resumable loader state; no checksum check on "
    "read found",
}


def in_fresh_process(phase: str, directory: Path, options: dict[str, object]) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--args",
        json.dumps({**options, "directory": str(directory)}),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{phase} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--block-shards", type=int, default=4)
    parser.add_argument("--chunk-mb", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        torch.set_num_threads(1)
        options = json.loads(args.args)
        print(json.dumps(PHASES[args.phase](Path(options.pop("directory")), **options)))
        return
    options = {"rows": args.rows, "batch": args.batch, "block_shards": args.block_shards}
    options |= {"chunk_mb": args.chunk_mb, "workers": args.workers}
    root = Path(tempfile.mkdtemp(prefix="hookmix-storage-", dir=args.dir))
    try:
        table = {}
        for backend in ("hookmix", "litdata"):
            directory = root / backend
            directory.mkdir()
            written = in_fresh_process(f"write_{backend}", directory, options)
            size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
            drop_page_cache(directory)
            epoch = in_fresh_process(f"epoch_{backend}", directory, options)
            assert epoch["rows"] == args.rows, epoch
            table[backend] = (written, epoch, size)
        drop_page_cache(root / "hookmix")
        plain = in_fresh_process("epoch_plain", root / "hookmix", options)
        print(f"{args.rows} rows x {FEATURES} float16, batches of {args.batch}, cold page cache before each epoch")
        print(f"{'backend':8} {'write s':>8} {'epoch s':>8} {'GB/s':>6} {'peak RSS GB':>11} {'disk GB':>8}")
        for backend, (written, epoch, size) in table.items():
            print(
                f"{backend:8} {written['seconds']:8.1f} {epoch['seconds']:8.2f} {size / GB / epoch['seconds']:6.2f} "
                f"{epoch['peak_rss_gb']:11.2f} {size / GB:8.2f}"
            )
        size = table["hookmix"][2]
        seconds, rss = plain["seconds"], plain["peak_rss_gb"]
        print(f"{'plain':8} {'':8} {seconds:8.2f} {size / GB / seconds:6.2f} {rss:11.2f}")
        for backend, note in OBJECT_STORAGE_AND_DDP.items():
            print(f"{backend}: {note}")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
