"""Head-only fine-tuning on a GPU: extraction vs plain inference throughput, head epochs per second, and
the hooked loop against the cache path — the measure of ``benchmarks/head_only.py`` on CUDA, in one run.

    python benchmarks/gpu_head_only.py [--images 4096] [--epochs 20] [--hooked-epochs 2] [--device cuda]

Prints the card's name with the figures. Without a CUDA device it says so and measures nothing;
``--device cpu`` runs the same script on the CPU (with ``--images 16``: a check that it works, not a figure).
"""

from __future__ import annotations

import argparse

import torch
from head_only import measure, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hooked-epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to check the script")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: not measured on a GPU")
        return
    if device.type == "cuda":
        measure(device, 256, 1, 1, args.batch)  # warm-up: cuDNN autotuning and allocator growth stay out of the figures
        where = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    else:
        where = f"CPU threads={torch.get_num_threads()}, torch {torch.__version__}"
    figures = measure(device, args.images, args.epochs, args.hooked_epochs, args.batch)
    report(figures, args.hooked_epochs, where)


if __name__ == "__main__":
    main()
