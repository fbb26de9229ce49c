"""Head-only fine-tuning on a GPU: extraction vs plain inference throughput, head epochs per second, and
the hooked loop against the cache path — the measure of ``benchmarks/head_only.py`` on CUDA, in one run.

    python benchmarks/gpu_head_only.py [--images 4096] [--epochs 20] [--hooked-epochs 2]

Prints the card's name with the figures. Without a CUDA device it says so and measures nothing.
"""

from __future__ import annotations

import argparse
import sys

import torch
from head_only import measure, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hooked-epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: not measured on a GPU")
        sys.exit(0)
    device = torch.device("cuda")
    measure(device, 256, 1, 1, args.batch)  # warm-up: cuDNN autotuning and allocator growth stay out of the figures
    figures = measure(device, args.images, args.epochs, args.hooked_epochs, args.batch)
    report(figures, args.hooked_epochs, f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
