"""Head-only fine-tuning: cache path vs hooked full forward, measured side by side in one run.

ResNet50 (random init) cut at ``layer4``; N synthetic 224 px images; E head epochs:

* (a) plain   — one inference pass of the whole model over the data (eval, no grad; autocast on a GPU,
  as the extraction uses);
* (b) cache   — extract layer4 features once (float16) + E head epochs on them with mixup;
* (c) hooked  — the same E epochs as a hooked full forward with the frozen backbone, i.e. the backbone
  runs every epoch. Its per-epoch cost is constant, so by default only ``--hooked-epochs`` epochs run
  and the total for E is projected (printed as such); ``--hooked-epochs E`` runs them all.

Prints b/a (goal <= 1.3), c/b (goal >= 10), extraction throughput / plain inference throughput
(goal >= 0.9), head epochs per second and the cache's bytes per image. ``benchmarks/gpu_head_only.py``
runs the same measure on a GPU.

    python benchmarks/head_only.py [--images 512] [--epochs 20] [--hooked-epochs 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch
import torchvision
from torch.utils.data import TensorDataset

from hookmix import CacheKey, FeatureCache, FitConfig, fit, split
from hookmix.core.devices import autocast_dtype, resolve_device


@dataclass
class Figures:
    images: int
    epochs: int
    plain_s: float
    extract_s: float
    head_s: float
    hooked_run_s: float
    hooked_s: float
    bytes_per_image: int
    cache_dtype: torch.dtype
    feature_shape: tuple[int, ...]


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(device: torch.device, images: int, epochs: int, hooked_epochs: int, batch: int) -> Figures:
    """Run (a), (b) and (c) on ``device`` and return their times."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, 224, 224, generator=gen)
    y = torch.randint(0, 10, (images,), generator=gen)
    val_x, val_y = x[:64], y[:64]
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval().to(device)
    half = autocast_dtype(device)

    start = _clock(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=half, enabled=half is not None):
        for i in range(0, images, batch):
            model(x[i : i + batch].to(device, non_blocking=True))
    plain_s = _clock(device) - start

    backbone, head = split(copy.deepcopy(model), "layer4")
    key = CacheKey("torchvision:resnet50:random", "layer4", (3, 224, 224), "none", "synthetic")
    start = _clock(device)
    cache = FeatureCache.extract(backbone, TensorDataset(x, y), key, batch_size=batch, device=device, progress=False)
    extract_s = _clock(device) - start
    val_cache = FeatureCache.extract(
        backbone, TensorDataset(val_x, val_y), key, batch_size=batch, device=device, progress=False
    )
    start = _clock(device)
    fit(
        head, "input", cache.features, cache.labels, val_cache.features[0], val_cache.labels,
        FitConfig(epochs=epochs, batch_size=32, seed=0), num_classes=10, device=device, progress=False,
    )  # fmt: skip
    head_s = _clock(device) - start

    hooked_model = copy.deepcopy(model)
    hooked_model.requires_grad_(False)
    hooked_model.fc.requires_grad_(True)
    start = _clock(device)
    fit(
        hooked_model, "layer4", x, y, val_x, val_y, FitConfig(epochs=hooked_epochs, batch_size=32, seed=0),
        num_classes=10, device=device, progress=False,
    )  # fmt: skip
    hooked_run_s = _clock(device) - start
    return Figures(
        images=images,
        epochs=epochs,
        plain_s=plain_s,
        extract_s=extract_s,
        head_s=head_s,
        hooked_run_s=hooked_run_s,
        hooked_s=hooked_run_s * epochs / hooked_epochs,
        bytes_per_image=cache.bytes_per_example,
        cache_dtype=cache.dtype,
        feature_shape=tuple(cache.feature_shape),
    )


def report(f: Figures, hooked_epochs: int, where: str) -> None:
    n, cache_s = f.images, f.extract_s + f.head_s
    print(f"ResNet50 @ layer4, {n} images 224px, {f.epochs} head epochs, {where}")
    print(f"  (a) plain inference pass       {f.plain_s:8.1f} s  ({n / f.plain_s:.1f} img/s)")
    print(f"  (b) cache: extract {f.extract_s:.1f} s ({n / f.extract_s:.1f} img/s) + {f.epochs} head epochs "
          f"{f.head_s:.1f} s = {cache_s:8.1f} s")  # fmt: skip
    projected = "" if hooked_epochs == f.epochs else f" (ran {hooked_epochs} epochs: {f.hooked_run_s:.1f} s)"
    print(f"  (c) hooked full forward        {f.hooked_s:8.1f} s{projected}")
    print(f"  b / a = {cache_s / f.plain_s:.2f}   (goal <= 1.3)")
    print(f"  c / b = {f.hooked_s / cache_s:.1f}   (goal >= 10)")
    print(f"  extraction / plain inference throughput = {f.plain_s / f.extract_s:.2f}   (goal >= 0.9)")
    print(f"  head epochs per second = {f.epochs / f.head_s:.2f}")
    print(f"  cache bytes per image = {f.bytes_per_image:,} ({f.cache_dtype}, {f.feature_shape})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hooked-epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    figures = measure(device, args.images, args.epochs, args.hooked_epochs, args.batch)
    where = f"CPU threads={torch.get_num_threads()}" if device.type == "cpu" else str(device)
    report(figures, args.hooked_epochs, where)


if __name__ == "__main__":
    main()
