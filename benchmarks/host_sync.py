"""Does a head step of ``fit`` wait on the host? Counted on a GPU with ``torch.cuda.set_sync_debug_mode("warn")``.

Every synchronising CUDA call (``.item()``, ``.tolist()``, a blocking copy, ``nonzero``...) then warns; each warning
is logged with its Python stack. A fit has a few on purpose, once per fit or per epoch (the labels' move to the
device, the epoch's mean loss, the validation's logits back to the host), so the figure is a difference: one-epoch
fits of N and 4N rows (batches of 64, linear head on 2048 pooled float16 features, mixup α = 0.4), in memory
(preloaded on the device) and streamed from an on-disk cache (blocks of 2 shards of 256 rows, gathered on the
device), and the host synchronisations per step = (syncs at 4N - syncs at N) / (steps at 4N - steps at N), goal 0.
Each call site whose count grows with the steps is printed with its stack.

``torch.cuda.set_sync_debug_mode("error")`` would stop at the first synchronisation, one of the once-per-fit ones;
"warn" counts them all. On the CPU (``--device cpu``: a check that the script runs) nothing is counted; the
logger is checked with a warning of its own.

    python benchmarks/host_sync.py [--rows 4096] [--device cuda]

Its last line is ``RESULT {json}`` for ``benchmarks/bench_gpu.py``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from hookmix import CacheKey, FeatureCache, FitConfig, MixSettings, fit

DIMS, CLASSES, BATCH, SHARD = 2048, 10, 64, 256
KEY = CacheKey("benchmark:pooled", "input", (DIMS,), "none", "synthetic")
SYNC_MESSAGE = "called a synchronizing CUDA operation"


@contextmanager
def synchronisations(device: torch.device) -> Iterator[list[str]]:
    """Log the call site (the innermost two Python frames) of every synchronising CUDA call in the block."""
    sites: list[str] = []
    shown = warnings.showwarning

    def log(message: Warning | str, category: type[Warning], filename: str, lineno: int, *rest: Any) -> None:
        if SYNC_MESSAGE not in str(message):
            shown(message, category, filename, lineno, *rest)
            return
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        sites.append(" <- ".join(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-2:])))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = log
        if device.type != "cuda":
            yield sites
            return
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _short(path: str) -> str:
    for marker in ("/hookmix/", "/torch/", "/benchmarks/"):
        if marker in path:
            return marker.strip("/") + "/" + path.split(marker, 1)[1]
    return path


def data(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (rows,), generator=g)
    return (torch.randn(rows, DIMS, generator=g) + 0.1 * y[:, None]).half(), y


def one_fit(device: torch.device, rows: int, scratch: Path | None) -> tuple[int, list[str]]:
    """Steps and synchronisation sites of a one-epoch fit on ``rows`` rows (streamed from ``scratch`` if given)."""
    x, y = data(rows, rows)
    val_x, val_y = data(256, 0)
    blocks = None
    if scratch is not None:
        options = dict(path=scratch / str(rows), dtype=torch.float16, shard_size=SHARD, batch_size=SHARD)
        FeatureCache.extract(nn.Identity(), TensorDataset(x, y), KEY, progress=False, **options)
        cache = FeatureCache.load(scratch / str(rows), KEY, mmap=True)
        x, y, blocks = cache.features, cache.labels, cache.features.layout(2)
    torch.manual_seed(0)
    head = nn.Linear(DIMS, CLASSES)
    config = FitConfig(epochs=1, batch_size=BATCH, mixing=MixSettings(alpha=0.4), seed=0)
    with synchronisations(device) as sites:
        fit(head, "input", x, y, val_x.float(), val_y, config, num_classes=CLASSES, device=device, preload=True,
            blocks=blocks, progress=False)  # fmt: skip
    return -(-rows // BATCH), sites


def compare(device: torch.device, rows: int, scratch: Path | None) -> dict[str, Any]:
    """Fits of ``rows`` and ``4 * rows``: syncs per step, and the sites whose count grows with the steps."""
    (few_steps, few), (many_steps, many) = one_fit(device, rows, scratch), one_fit(device, 4 * rows, scratch)
    grown = Counter(many) - Counter(few)
    return {
        "steps": [few_steps, many_steps],
        "syncs": [len(few), len(many)] if device.type == "cuda" else None,
        "syncs_per_step": (len(many) - len(few)) / (many_steps - few_steps) if device.type == "cuda" else None,
        "growing_sites": dict(grown.most_common(5)),
        "sites_per_fit": dict(Counter(few).most_common(12)),
    }


def measure_host_syncs(device_name: str, rows: int) -> dict[str, Any]:
    device = torch.device(device_name)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (nothing counted)"
    fit(nn.Linear(DIMS, CLASSES), "input", *data(2 * BATCH, 1), *data(BATCH, 2), FitConfig(epochs=1),
        num_classes=CLASSES, device=device, progress=False)  # fmt: skip  # warm-up: CUDA context, cuBLAS
    with tempfile.TemporaryDirectory(prefix="hookmix-host-sync-") as scratch:
        found = {
            "device": where,
            "in_memory": compare(device, rows, None),
            "streamed": compare(device, rows, Path(scratch)),
        }
    if device.type != "cuda":  # nothing synchronises on the CPU: check that the logger would see a warning
        with synchronisations(device) as sites:
            warnings.warn(SYNC_MESSAGE, stacklevel=1)
        print(f"logger check (CPU): {sites}")
    for path, figures in (("in memory", found["in_memory"]), ("streamed", found["streamed"])):
        print(f"{path}: {figures['steps']} steps -> {figures['syncs']} host syncs; per step {figures['syncs_per_step']}"
              " (goal 0)")  # fmt: skip
        for site, count in figures["growing_sites"].items():
            print(f"  grows with the steps: +{count} at {site}")
        for site, count in figures["sites_per_fit"].items():
            print(f"  {count} x {site}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: not measured on a GPU")
        return
    print(f"host synchronisations of fit, {args.rows} and {4 * args.rows} rows, torch {torch.__version__}")
    print("RESULT " + json.dumps(measure_host_syncs(args.device, args.rows)), flush=True)


if __name__ == "__main__":
    main()
