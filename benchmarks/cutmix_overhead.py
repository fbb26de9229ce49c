"""Step overhead of CutMix at a layer, measured side by side in one run.

* ResNet50 (B=32, 224 px): plain train step vs CutMix boxes on ``layer4``'s (B, 2048, 7, 7) output;
* ViT-S/16 (B=32, 224 px): plain train step vs token CutMix on ``blocks.6``'s (B, 197, 384) tokens
  (class token never swapped).

Prints the median step times and the ratios (goal <= 1.02 each).

    python benchmarks/cutmix_overhead.py [--batch 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import functools

import timm
import torch
import torchvision
from torch import nn

from _timing import interleaved_medians, train_step
from hookmix import HookMixer


def compare(name: str, model: nn.Module, layer: str, x: torch.Tensor, rounds: int) -> None:
    y = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    model.train()
    with HookMixer(model, layer, alpha=0.0, cutmix_alpha=1.0, num_classes=1000, seed=0) as mixer:

        def plain() -> torch.Tensor:
            return criterion(model(x), y)

        def cutmix() -> torch.Tensor:
            step = mixer.plan(y)
            return step.loss(criterion, model(x))

        med = interleaved_medians(
            {"plain": functools.partial(train_step, optimizer, plain),
             "cutmix": functools.partial(train_step, optimizer, cutmix)},
            rounds,
        )
    print(f"{name} @ {layer}: plain {med['plain'] * 1000:.1f} ms, cutmix {med['cutmix'] * 1000:.1f} ms, "
          f"cutmix / plain = {med['cutmix'] / med['plain']:.3f} (goal <= 1.02)\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    compare("ResNet50", torchvision.models.resnet50(), "layer4", x, args.rounds)
    vit = timm.create_model("vit_small_patch16_224", img_size=args.size)
    compare("ViT-S/16", vit, "blocks.6", x, args.rounds)


if __name__ == "__main__":
    main()
