"""Head-only fine-tuning: cache path vs hooked full forward, measured side by side in one run.

ResNet50 (random init) cut at ``layer4``; N synthetic 224 px images; E head epochs:

* (a) plain   — one inference pass of the whole model over the data (eval, no grad);
* (b) cache   — extract layer4 features once (float16) + E head epochs on them with mixup;
* (c) hooked  — the same E epochs as a hooked full forward with the frozen backbone, i.e. the backbone
  runs every epoch. Its per-epoch cost is constant, so by default only ``--hooked-epochs`` epochs run
  and the total for E is projected (printed as such); ``--hooked-epochs E`` runs them all.

Prints b/a (goal <= 1.3), c/b (goal >= 10), extraction throughput / plain inference throughput
(goal >= 0.9) and the cache's bytes per image.

    python benchmarks/head_only.py [--images 512] [--epochs 20] [--hooked-epochs 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torchvision
from torch.utils.data import TensorDataset

from hookmix import CacheKey, FeatureCache, FitConfig, fit, split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hooked-epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, 224, 224, generator=gen)
    y = torch.randint(0, 10, (args.images,), generator=gen)
    val_x, val_y = x[:64], y[:64]
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()

    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, args.images, args.batch):
            model(x[i : i + args.batch])
    plain_s = time.perf_counter() - start

    backbone, head = split(copy.deepcopy(model), "layer4")
    key = CacheKey("torchvision:resnet50:random", "layer4", (3, 224, 224), "none", "synthetic")
    start = time.perf_counter()
    cache = FeatureCache.extract(backbone, TensorDataset(x, y), key, batch_size=args.batch, progress=False)
    extract_s = time.perf_counter() - start
    val_cache = FeatureCache.extract(backbone, TensorDataset(val_x, val_y), key, batch_size=args.batch, progress=False)
    config = FitConfig(epochs=args.epochs, batch_size=32, seed=0)
    start = time.perf_counter()
    fit(
        head,
        "input",
        cache.features,
        cache.labels,
        val_cache.features[0],
        val_cache.labels,
        config,
        num_classes=10,
        progress=False,
    )
    head_s = time.perf_counter() - start
    cache_s = extract_s + head_s

    hooked_model = copy.deepcopy(model)
    hooked_model.requires_grad_(False)
    hooked_model.fc.requires_grad_(True)
    hooked_config = FitConfig(epochs=args.hooked_epochs, batch_size=32, seed=0)
    start = time.perf_counter()
    fit(hooked_model, "layer4", x, y, val_x, val_y, hooked_config, num_classes=10, progress=False)
    hooked_run_s = time.perf_counter() - start
    hooked_s = hooked_run_s * args.epochs / args.hooked_epochs

    n = args.images
    print(f"ResNet50 @ layer4, {n} images 224px, {args.epochs} head epochs, CPU threads={torch.get_num_threads()}")
    print(f"  (a) plain inference pass       {plain_s:8.1f} s  ({n / plain_s:.1f} img/s)")
    print(f"  (b) cache: extract {extract_s:.1f} s + {args.epochs} head epochs {head_s:.1f} s = {cache_s:8.1f} s")
    projected = "" if args.hooked_epochs == args.epochs else f" (ran {args.hooked_epochs} epochs: {hooked_run_s:.1f} s)"
    print(f"  (c) hooked full forward        {hooked_s:8.1f} s{projected}")
    print(f"  b / a = {cache_s / plain_s:.2f}   (goal <= 1.3)")
    print(f"  c / b = {hooked_s / cache_s:.1f}   (goal >= 10)")
    print(f"  extraction / plain inference throughput = {plain_s / extract_s:.2f}   (goal >= 0.9)")
    print(f"  cache bytes per image = {cache.bytes_per_example:,} ({cache.dtype}, {tuple(cache.feature_shape)})")


if __name__ == "__main__":
    main()
