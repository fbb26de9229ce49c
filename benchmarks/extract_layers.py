"""Extracting two layers in ONE backbone pass vs extracting one: what ``hookmix sweep --layers layer3 layer4`` pays.

A resnet50 (random init, nothing downloaded) on N generated 224 px images; the cached points are those
``finetune`` / ``sweep`` pick with ``--head model``: the ``layer3`` map (1024×14×14) and the ``layer4`` features
after the average pool (2048). Timed in interleaved rounds, in memory (no disk):

- one pass: :meth:`hookmix.FeatureCache.extract_many` with :class:`hookmix.headonly.taps.LayerTaps` on both
  layers (the forward stopped after ``layer4``);
- ``layer4`` alone and ``layer3`` alone: :meth:`hookmix.FeatureCache.extract` with each layer's split backbone
  (what each ``finetune --layer`` runs).

Prints the medians, one pass / ``layer4`` alone (goal <= 1.15), and the two single-layer passes' total against
the one pass (the sweep's saving); checks that the one-pass features equal the single-layer ones bitwise.

    OMP_NUM_THREADS=2 python benchmarks/extract_layers.py [--n 32] [--rounds 5] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians  # noqa: E402
from hookmix.headonly.cache import CacheKey, FeatureCache  # noqa: E402
from hookmix.headonly.taps import LayerTaps  # noqa: E402
from hookmix.headonly.trained_model import assemble  # noqa: E402

SIZE = (3, 224, 224)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="generated images")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    g = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.rand(args.n, *SIZE, generator=g), torch.randint(0, 10, (args.n,), generator=g))
    backbones, names = {}, {}
    for layer in ("layer3", "layer4"):
        backbone, _, fixed = assemble(model, layer, "model", input_size=SIZE, num_classes=1000)
        backbones[layer], names[layer] = backbone, "+".join((layer, *fixed))
    keys = {layer: CacheKey("bench:resnet50", names[layer], SIZE, "none") for layer in backbones}
    taps = {names[layer]: (layer, backbones[layer][1] if names[layer] != layer else None) for layer in backbones}
    options = dict(batch_size=args.batch_size, progress=False)
    found: dict[str, dict[str, FeatureCache]] = {}
    times: dict[str, list[float]] = {"one pass": [], "layer4": [], "layer3": []}

    def timed(name: str, extract: Callable[[], dict[str, FeatureCache]]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            found[name] = extract()
            times[name].append(time.perf_counter() - start)
            return times[name][-1]

        return run

    targets = {names[layer]: (keys[layer], None) for layer in backbones}
    variants = {
        "one pass (layer3+layer4)": timed(
            "one pass", lambda: FeatureCache.extract_many(lambda _: LayerTaps(model, taps), dataset, targets, **options)
        ),
        **{
            f"{layer} alone": timed(
                layer,
                lambda layer=layer: {
                    names[layer]: FeatureCache.extract(backbones[layer], dataset, keys[layer], **options)
                },
            )
            for layer in ("layer4", "layer3")
        },
    }
    print(f"resnet50, {args.n} images {SIZE[1]} px, batch {args.batch_size}, threads {torch.get_num_threads()}")
    medians = interleaved_medians(variants, args.rounds)
    for layer in backbones:
        ours, theirs = found["one pass"][names[layer]], found[layer][names[layer]]
        same = ours.dtype == theirs.dtype and torch.equal(ours.features, theirs.features)
        print(f"{names[layer]}: features {tuple(ours.feature_shape)} {ours.dtype}, bitwise equal to alone: {same}")
    both, four, three = medians.values()
    print(f"medians: one pass {both:.2f} s, layer4 alone {four:.2f} s, layer3 alone {three:.2f} s")
    rounds = [a / b for a, b in zip(times["one pass"][1:], times["layer4"][1:])]  # [0]: the warm-up
    spread = f"per round {min(rounds):.2f} - {max(rounds):.2f}, median {statistics.median(rounds):.3f}"
    print(f"one pass / layer4 alone = {both / four:.3f} (goal <= 1.15; {spread})")
    print(f"two single-layer passes {four + three:.2f} s / one pass = {(four + three) / both:.2f}")


if __name__ == "__main__":
    main()
