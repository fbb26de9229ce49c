"""A sweep's grid of heads trained together vs the same heads trained one by one with ``fit``.

24 heads (α 0 0.2 0.4 1.0 × lr 1e-3 3e-3 × 3 seeds) on synthetic resnet50-sized pooled features
(N=5000 × 2048, 10 classes, batch 64): ``hookmix.headonly.sweep.fit_grid`` (stacked) against 24 calls of
``hookmix.fit``, timed in interleaved rounds, one row per head kind: ``linear`` (one ``nn.Linear``: one GEMM
per seed, logit mixing) and ``mlp`` (fastai's head, BatchNorm and dropout: ``vmap`` over stacked parameters and
running statistics). Each row prints both medians and the ratio (goal <= 0.25 on a CPU, <= 0.1 on a GPU), the
largest difference of a final validation NLL between the two, and the grid's peak memory beyond its inputs,
per head: on a GPU ``torch.cuda.max_memory_allocated``; on a CPU the growth of the process's peak RSS during
the first grid run (measured before anything else runs, so the peak is the grid's).

    python benchmarks/sweep.py [--heads linear mlp] [--epochs 20] [--rounds 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians  # noqa: E402
from hookmix.headonly.heads import build_head  # noqa: E402
from hookmix.headonly.sweep import fit_grid, grid_configs  # noqa: E402
from hookmix.headonly.training import FitConfig, fit  # noqa: E402

ALPHAS, LRS, SEEDS = (0.0, 0.2, 0.4, 1.0), (1e-3, 3e-3), (0, 1, 2)
DIMS, CLASSES = 2048, 10


def _data(n: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(CLASSES, DIMS, generator=g) * 0.1
    y, vy = torch.randint(0, CLASSES, (n,), generator=g), torch.randint(0, CLASSES, (1000,), generator=g)
    return centers[y] + torch.randn(n, DIMS, generator=g), y, centers[vy] + torch.randn(1000, DIMS, generator=g), vy


def _rss_mib() -> float:
    """The process's current resident memory in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mib(train: Callable[[], object], device: str) -> float:
    """The peak memory beyond what was held before ``train`` ran, in MiB."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - held) / 2**20
    before = _rss_mib()
    train()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10 - before  # ru_maxrss: KiB on Linux


def _row(kind: str, data: tuple[torch.Tensor, ...], args: argparse.Namespace) -> None:
    configs = grid_configs(FitConfig(epochs=args.epochs, batch_size=64), ALPHAS, LRS, SEEDS)
    finals: dict[str, list[float]] = {}

    def head(seed: int) -> torch.nn.Module:
        return build_head(kind, feature_shape=(DIMS,), num_classes=CLASSES, seed=seed).to(args.device)

    def together() -> None:
        heads = [head(c.seed) for c in configs]
        results = fit_grid(heads, configs, *data, num_classes=CLASSES, device=args.device, progress=False)
        finals["together"] = [r.final["val_nll"] for r in results]

    def one_by_one() -> None:
        finals["one_by_one"] = [
            fit(head(c.seed), "input", *data, c, num_classes=CLASSES, device=args.device, progress=False).final[
                "val_nll"
            ]
            for c in configs
        ]

    def timed(train: Callable[[], None]) -> Callable[[], float]:
        def run() -> float:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            began = time.perf_counter()
            train()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - began

        return run

    peak = _peak_mib(together, args.device) if kind == args.heads[0] else float("nan")
    medians = interleaved_medians({"together": timed(together), "one_by_one": timed(one_by_one)}, args.rounds)
    worst = max(abs(a - b) for a, b in zip(finals["together"], finals["one_by_one"]))
    print(f"{kind}: {len(configs)} heads, N={args.n}, {args.epochs} epochs, device {args.device}")
    print(
        f"{kind}: together {medians['together']:.2f} s, one by one {medians['one_by_one']:.2f} s, "
        f"ratio {medians['together'] / medians['one_by_one']:.3f} (goal <= 0.25 CPU, <= 0.1 GPU)"
    )
    print(f"{kind}: largest |val NLL together - one by one| over the cells: {worst:.2e}")
    if peak == peak:  # only the first row's grid runs before anything else (a CPU peak RSS is the process's)
        print(f"{kind}: grid peak memory beyond its inputs {peak:.1f} MiB, {peak / len(configs):.2f} MiB per head")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", choices=("linear", "mlp"), default=["linear", "mlp"])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    data = _data(args.n)
    for kind in args.heads:
        _row(kind, data, args)


if __name__ == "__main__":
    main()
