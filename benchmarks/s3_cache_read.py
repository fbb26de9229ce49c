"""Read throughput of a feature cache in object storage against the same cache on local disk.

Starts moto's standalone S3 server on 127.0.0.1 (the server the tests use: a Python process, so its throughput,
not the network's, bounds the S3 figure; on AWS or MinIO expect other numbers), writes one synthetic cache both
to a local directory and to ``s3://bench/cache``, then, interleaved over rounds (median reported):

* ``load``: ``FeatureCache.load(..., mmap=False)`` (every shard read, sha256 checked, copied into one tensor);
* ``epoch``: one streamed epoch of ``ShardedFeatures.batches`` (blocks of shards, reader threads one block ahead);
* ``plain``: a plain sequential read of the local shard files (cold: page cache dropped first).

The local figures are taken with the page cache dropped before each round (cold disk), the S3 figures include
the server's reads from its memory. Run: ``python benchmarks/s3_cache_read.py --mb 256``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from _disk import drop_page_cache, read_shards
from _timing import interleaved_medians
from hookmix.headonly.cache import CacheKey, FeatureCache

KEY = CacheKey("bench:synthetic", "input", (2048,), "none", "rows")


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/data.json", timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="cache size in MB (float16 rows of 2048)")
    parser.add_argument("--shard-rows", type=int, default=4096, help="rows per shard (16 MiB at 2048 x fp16)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    proc, endpoint = start_server()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=endpoint,
    )
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        rows = args.mb * 10**6 // (2048 * 2)
        cache = FeatureCache(torch.randn(1, rows, 2048).half(), torch.zeros(rows, dtype=torch.long), KEY)
        with tempfile.TemporaryDirectory() as tmp:
            local, url = Path(tmp) / "cache", "s3://bench/cache"
            start = time.perf_counter()
            cache.save(local, shard_size=args.shard_rows)
            local_write = time.perf_counter() - start
            start = time.perf_counter()
            cache.save(url, shard_size=args.shard_rows)
            s3_write = time.perf_counter() - start
            size = sum(p.stat().st_size for p in local.glob("shard-*"))

            def load(where: str | Path) -> float:
                if where == local:
                    drop_page_cache(local)
                start = time.perf_counter()
                FeatureCache.load(where, KEY)
                return time.perf_counter() - start

            def epoch(where: str | Path) -> float:
                if where == local:
                    drop_page_cache(local)
                features = FeatureCache.load(where, KEY, mmap=True).features
                order = features.layout().order(torch.Generator().manual_seed(0))
                start = time.perf_counter()
                for _ in features.batches(order, torch.zeros(rows, dtype=torch.long), 1024):
                    pass
                return time.perf_counter() - start

            def plain() -> float:
                drop_page_cache(local)
                return read_shards(local)[0]

            medians = interleaved_medians(
                {
                    "plain local read": plain,
                    "load local": lambda: load(local),
                    "load s3": lambda: load(url),
                    "epoch local": lambda: epoch(local),
                    "epoch s3": lambda: epoch(url),
                },
                args.rounds,
            )
    finally:
        proc.kill()
    shards = -(-rows // args.shard_rows)
    print(f"cache {size / 1e6:.0f} MB in {shards} shards; write local {local_write:.2f} s, s3 {s3_write:.2f} s")
    for name, seconds in medians.items():
        print(f"{name:18s} {seconds:7.2f} s  {size / seconds / 1e6:8.0f} MB/s")
    load_ratio, epoch_ratio = (medians[f"{what} s3"] / medians[f"{what} local"] for what in ("load", "epoch"))
    print(f"s3 / local: load {load_ratio:.2f}, epoch {epoch_ratio:.2f}")


if __name__ == "__main__":
    main()
