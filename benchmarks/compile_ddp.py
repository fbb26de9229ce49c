"""The hook under torch.compile and under DistributedDataParallel, measured side by side.

* compile — a ResNet train step (forward, backward, SGD) through ``torch.compile`` (inductor), plain and
  with ``HookMixer`` at ``--layer``, on two copies of the same model, one step of each per round.
  Goal: compiled hooked / compiled plain <= 1.05. Both copies share one class, so dynamo is told to
  guard on module hooks (``skip_nnmodule_hook_guards = False``; see the README's limits).
* ddp — the hooked (and plain) eager train step with a per-rank batch of ``--ddp-batch`` rows: in one
  process, and in each of 2 gloo processes under DDP (every process on 1 CPU thread, so the 2-process
  run uses 2 cores for twice the rows). The ratio DDP / single is the cost of DDP's gradient all-reduce
  (weak scaling); hooked / plain under DDP is hookmix's own cost there.

    python benchmarks/compile_ddp.py [--part all|compile|ddp] [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hookmix import HookMixer
from hookmix.headonly.distributed import rank_seed

Step = Callable[[], None]


def train_step(model: nn.Module, run: nn.Module, mixer: HookMixer | None, x: torch.Tensor, y: torch.Tensor) -> Step:
    """One SGD train step of ``run`` (``model`` or a wrapper of it), mixed when ``mixer`` is given."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if mixer is None:
            loss = criterion(run(x), y)
        else:
            loss = mixer.plan(y).loss(criterion, run(x))
        loss.backward()
        optimizer.step()

    return step


def paired_medians(steps: dict[str, Step], rounds: int) -> dict[str, float]:
    """Median seconds per step of "plain" and "hooked", and the median of their per-round ratio.

    Each round runs one step of each, in alternating order, so load from other processes hits both alike.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(rounds):
        for name in ("plain", "hooked") if index % 2 == 0 else ("hooked", "plain"):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    ratios = [h / p for h, p in zip(times["hooked"], times["plain"])]
    return {name: statistics.median(values) for name, values in times.items()} | {
        "hooked/plain": statistics.median(ratios)
    }


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10)


def batch(rows: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 3, size, size, generator=g), torch.randint(0, 10, (rows,), generator=g)


def plain_and_hooked(
    model: nn.Module, run: Callable[[nn.Module], nn.Module], layer: str, x: torch.Tensor, y: torch.Tensor, seed: int
) -> dict[str, Step]:
    """Train steps of two copies of ``model`` (each wrapped by ``run``): one plain, one hooked at ``layer``."""
    plain, hooked = model, copy.deepcopy(model)
    wrapped_hooked = run(hooked)
    mixer = HookMixer(wrapped_hooked, layer, alpha=0.4, seed=seed)
    return {
        "plain": train_step(plain, run(plain), None, x, y),
        "hooked": train_step(hooked, wrapped_hooked, mixer, x, y),
    }


def bench_compile(args: argparse.Namespace) -> dict[str, float]:
    # dynamo does not guard on module hooks by default, so the hooked copy would reuse the graph compiled
    # for the plain copy of the same class (the mixer then raises at the next plan): guard on hooks
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    x, y = batch(args.batch, args.size)
    steps = plain_and_hooked(make_model(args.model), torch.compile, args.layer, x, y, seed=0)
    first_step = {}
    for name, step in steps.items():  # compile both (forward and backward graphs) before timing
        start = time.perf_counter()
        step()
        first_step[f"{name} first step (compiling)"] = time.perf_counter() - start
        step()
    return first_step | paired_medians(steps, args.rounds)


def _ddp_rank(rank: int, args: argparse.Namespace, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        x, y = batch(args.ddp_batch, args.size, seed=rank)
        steps = plain_and_hooked(make_model(args.model), DistributedDataParallel, args.layer, x, y, seed=rank_seed(0))
        for step in steps.values():
            step()
        medians = paired_medians(steps, args.rounds)
        if rank == 0:
            Path(out).write_text(json.dumps(medians))
    finally:
        dist.destroy_process_group()


def bench_ddp(args: argparse.Namespace) -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = batch(args.ddp_batch, args.size)
        steps = plain_and_hooked(make_model(args.model), lambda m: m, args.layer, x, y, seed=0)
        for step in steps.values():
            step()
        single = paired_medians(steps, args.rounds)
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        mp.spawn(_ddp_rank, args=(args, str(Path(tmp) / "store"), str(out)), nprocs=2, join=True)
        ddp = json.loads(out.read_text())
    return {f"single {k}": v for k, v in single.items()} | {f"ddp {k}": v for k, v in ddp.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "compile", "ddp"), default="all")
    parser.add_argument("--model", default="resnet18", help="torchvision model (random init)")
    parser.add_argument("--layer", default="layer3")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=32, help="batch of the compile comparison")
    parser.add_argument("--ddp-batch", type=int, default=16, help="rows per rank (and of the single process)")
    parser.add_argument("--rounds", type=int, default=15, help="timed steps of each variant")
    args = parser.parse_args()
    print(f"{args.model} @ {args.layer}, {args.size}px, medians of {args.rounds} paired steps")
    if args.part in ("all", "ddp"):
        r = bench_ddp(args)
        print(f"DDP (gloo, 1 thread per process), {args.ddp_batch} rows per rank:")
        for name in ("single plain", "single hooked", "ddp plain", "ddp hooked"):
            print(f"  {name:<14} {r[name] * 1000:8.1f} ms")
        print(f"  DDP 2-process / single process (hooked) = {r['ddp hooked'] / r['single hooked']:.3f}")
        print(
            f"  hooked / plain (median of paired steps): single {r['single hooked/plain']:.3f}, "
            f"DDP {r['ddp hooked/plain']:.3f}"
        )
    if args.part in ("all", "compile"):
        r = bench_compile(args)
        print(f"torch.compile (inductor), B={args.batch}, CPU threads={torch.get_num_threads()}:")
        for name in ("plain first step (compiling)", "hooked first step (compiling)", "plain", "hooked"):
            print(f"  {name:<30} {r[name] * 1000:10.1f} ms")
        print(f"  compiled hooked / compiled plain = {r['hooked/plain']:.3f} (median of paired steps; goal <= 1.05)")


if __name__ == "__main__":
    main()
