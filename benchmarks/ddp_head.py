"""Is DDP worth it for a head on cached features? ``hookmix.fit`` in one process against ``fit(ddp=True)`` on 2
gloo ranks (torchrun), side by side on this machine, for the same global batch.

A linear head (AdamW, cross-entropy, no mixing) on random in-memory fp16 features; the time per step is the
median over steps of each epoch's wall time divided by its steps (the slowest rank under DDP). Prints the
ratio DDP / one process (> 1: DDP is slower). The job's ``--ddp auto`` rule quotes these figures.

    python benchmarks/ddp_head.py [--rows 4096] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from hookmix import FitConfig, fit

SHAPES = ((2048, 1000, 64), (2048, 1000, 256), (512, 10, 64), (512, 10, 256))  # features, classes, global batch


def step_ms(features: int, classes: int, batch: int, rows: int, epochs: int, ddp: bool) -> float:
    """Median ms per step of ``fit`` (epochs of ``rows`` rows), one process or this rank of a DDP group."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, features, generator=g).half(), torch.randint(0, classes, (rows,), generator=g)
    head = torch.nn.Linear(features, classes)
    times = []
    for _ in range(epochs):  # one fit per epoch: the wall time of one epoch each
        config = FitConfig(epochs=1, batch_size=batch, mix=False)
        start = time.perf_counter()
        fit(head, "input", x, y, x[:batch], y[:batch], config, num_classes=classes, ddp=ddp, progress=False)
        times.append(1000 * (time.perf_counter() - start) / (rows // batch))
    if ddp:
        slowest = torch.tensor(times)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times = slowest.tolist()
    return statistics.median(times[1:] or times)  # the first epoch warms up


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    try:
        ms = {str(shape): step_ms(*shape, args.rows, args.epochs, ddp=True) for shape in SHAPES}
        if dist.get_rank() == 0:
            print(json.dumps(ms))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    flags = ["--rows", str(args.rows), "--epochs", str(args.epochs), "--worker"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([*launch, __file__, *flags], env=env, capture_output=True, text=True, check=True)
    ddp = json.loads(done.stdout.strip().splitlines()[-1])
    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    print(f"{'features->classes':>18} {'batch':>6} {'1 process ms':>13} {'DDP 2 gloo ms':>14} {'DDP/1':>6}")
    for shape in SHAPES:
        one = step_ms(*shape, args.rows, args.epochs, ddp=False)
        two = ddp[str(shape)]
        print(f"{shape[0]:>10}->{shape[1]:<7} {shape[2]:>6} {one:>13.2f} {two:>14.2f} {two / one:>6.1f}")


if __name__ == "__main__":
    main()
