"""A fast start: ``hookmix finetune`` against one plain inference pass over the same image folder, both as
fresh processes (imports included), measured side by side in one run.

ResNet50 (random init) on an ImageFolder of N generated 224 px images, ``--layer layer4``, E epochs, a
fresh cache; then the same command again, on the cache it wrote. Prints finetune / plain (goal <= 1.3)
and where a re-run's time goes.

    python benchmarks/startup.py [--images 256] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

PLAIN = """
import sys, time
start = time.perf_counter()
import torch, torchvision
from torchvision import datasets
model = torchvision.models.resnet50(num_classes=3).eval()
weights = torchvision.models.ResNet50_Weights.DEFAULT
folder = datasets.ImageFolder(sys.argv[1], transform=weights.transforms())
loader = torch.utils.data.DataLoader(folder, batch_size=64)
with torch.no_grad():
    for x, _ in loader:
        model(x)
print(time.perf_counter() - start)
"""


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        for index in range(args.images):
            folder = root / f"class{index % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((256, 256, 3)) * 255).astype("uint8")).save(folder / f"{index}.png")
        hookmix = Path(sys.executable).with_name("hookmix")
        command = [str(hookmix), "finetune", "--model", "resnet50", "--layer", "layer4", "--data", str(root)]
        command += ["--epochs", str(args.epochs), "--cache", f"{tmp}/cache", "--out", f"{tmp}/run", "--quiet"]
        plain_s = timed([sys.executable, "-c", PLAIN, str(root)])
        finetune_s = timed(command)
        report = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
        rerun_s = timed(command)
        imports_s = timed([sys.executable, "-c", "import torch, torchvision, timm"])
    print(f"ResNet50 @ layer4, {args.images} images 224px, {args.epochs} epochs, fresh processes")
    print(f"  plain inference pass (imports included)      {plain_s:6.1f} s")
    print(f"  hookmix finetune, fresh cache                 {finetune_s:6.1f} s "
          f"(extraction {report['extract_seconds']:.1f} s)")  # fmt: skip
    print(f"  hookmix finetune again, on its cache          {rerun_s:6.1f} s (imports alone {imports_s:.1f} s)")
    print(f"  finetune / plain = {finetune_s / plain_s:.2f}   (goal <= 1.3)")


if __name__ == "__main__":
    main()
