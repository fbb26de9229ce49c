"""A sweep's grid of heads trained together vs the same heads trained one by one with ``fit``.

24 linear heads (α 0 0.2 0.4 1.0 × lr 1e-3 3e-3 × 3 seeds) on synthetic resnet50-sized pooled features
(N=5000 × 2048, 10 classes, batch 64): ``hookmix.headonly.sweep.fit_grid`` (stacked) against 24 calls of
``hookmix.fit``, timed in interleaved rounds; prints both medians and the ratio (goal <= 0.25 on a CPU,
<= 0.1 on a GPU), the largest difference of a final validation NLL between the two, and the grid's peak
extra memory per head on a GPU.

    python benchmarks/sweep.py [--epochs 20] [--rounds 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians  # noqa: E402
from hookmix.headonly.sweep import fit_grid, grid_configs  # noqa: E402
from hookmix.headonly.training import FitConfig, fit  # noqa: E402

ALPHAS, LRS, SEEDS = (0.0, 0.2, 0.4, 1.0), (1e-3, 3e-3), (0, 1, 2)


def _data(n: int, dims: int, classes: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, dims, generator=g) * 0.1
    y, vy = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (1000,), generator=g)
    return centers[y] + torch.randn(n, dims, generator=g), y, centers[vy] + torch.randn(1000, dims, generator=g), vy


def _head(seed: int, dims: int, classes: int, device: str) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Linear(dims, classes).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    dims, classes = 2048, 10
    x, y, vx, vy = _data(args.n, dims, classes)
    configs = grid_configs(FitConfig(epochs=args.epochs, batch_size=64), ALPHAS, LRS, SEEDS)
    finals: dict[str, list[float]] = {}

    def timed(name: str, train) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.Event(enable_timing=True) if args.device.startswith("cuda") else None
        import time

        began = time.perf_counter()
        finals[name] = train()
        if start is not None:
            torch.cuda.synchronize()
            print(f"{name}: peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB", flush=True)
        return time.perf_counter() - began

    def together() -> list[float]:
        heads = [_head(c.seed, dims, classes, args.device) for c in configs]
        results = fit_grid(heads, configs, x, y, vx, vy, num_classes=classes, device=args.device, progress=False)
        return [r.final["val_nll"] for r in results]

    def one_by_one() -> list[float]:
        return [
            fit(
                _head(c.seed, dims, classes, args.device),
                "input",
                x,
                y,
                vx,
                vy,
                c,
                num_classes=classes,
                device=args.device,
                progress=False,
            ).final["val_nll"]
            for c in configs
        ]

    medians = interleaved_medians(
        {"together": lambda: timed("together", together), "one_by_one": lambda: timed("one_by_one", one_by_one)},
        args.rounds,
    )
    worst = max(abs(a - b) for a, b in zip(finals["together"], finals["one_by_one"]))
    print(f"{len(configs)} heads, N={args.n}, {args.epochs} epochs, device {args.device}")
    print(
        f"together {medians['together']:.2f} s, one by one {medians['one_by_one']:.2f} s, "
        f"ratio {medians['together'] / medians['one_by_one']:.3f} (goal <= 0.25 CPU, <= 0.1 GPU)"
    )
    print(f"largest |val NLL together - one by one| over the cells: {worst:.2e}")


if __name__ == "__main__":
    main()
