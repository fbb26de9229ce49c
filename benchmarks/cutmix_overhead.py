"""Step overhead of CutMix at a layer, measured side by side in one run.

* ResNet50 (B=32, 224 px): plain train step vs CutMix boxes on ``layer4``'s (B, 2048, 7, 7) output;
* ViT-S/16 (B=32, 224 px): plain train step vs token CutMix on ``blocks.6``'s (B, 197, 384) tokens
  (class token never swapped).

Prints the median step times and the ratios (goal <= 1.02 each). On a shared CPU the round-to-round
noise of a whole step (about ±5-10%) is larger than the goal, so it also times the hook's own work in
isolation — the same HookMixer on an ``nn.Identity`` fed an activation of the layer's shape, forward and
backward, armed vs not — and reports that added cost as a fraction of the plain step.

    python benchmarks/cutmix_overhead.py [--batch 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import functools
import time

import timm
import torch
import torchvision
from torch import nn

from _timing import interleaved_medians, train_step
from hookmix import HookMixer

MIX = {"alpha": 0.0, "cutmix_alpha": 1.0, "num_classes": 1000, "seed": 0}


def hook_cost(activation: torch.Tensor, y: torch.Tensor, prefix_tokens: int, rounds: int = 101) -> float:
    """Median seconds that arming the hook adds to a forward + backward through one activation."""
    layer = nn.Sequential(nn.Identity())
    a = activation.detach().requires_grad_(True)
    layout = "NCHW" if activation.dim() == 4 else "NLC"  # an Identity does not say; the real layer does
    with HookMixer(layer, "0", prefix_tokens=prefix_tokens, layout=layout, **MIX) as mixer:

        def timed(armed: bool) -> float:
            start = time.perf_counter()
            if armed:
                mixer.plan(y)
            layer(a).sum().backward()
            return time.perf_counter() - start

        med = interleaved_medians(
            {"armed": functools.partial(timed, True), "plain": functools.partial(timed, False)}, rounds, verbose=False
        )
    return med["armed"] - med["plain"]


def compare(name: str, model: nn.Module, layer: str, x: torch.Tensor, rounds: int) -> None:
    y = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    captured = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    with torch.no_grad():
        model.eval()(x[:1])
    handle.remove()
    activation = torch.randn(x.shape[0], *captured[0].shape[1:])  # the layer's output shape at batch B
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    model.train()
    with HookMixer(model, layer, **MIX) as mixer:

        def plain() -> torch.Tensor:
            return criterion(model(x), y)

        def cutmix() -> torch.Tensor:
            step = mixer.plan(y)
            return step.loss(criterion, model(x))

        med = interleaved_medians(
            {
                "plain": functools.partial(train_step, optimizer, plain),
                "cutmix": functools.partial(train_step, optimizer, cutmix),
            },
            rounds,
        )
    print(
        f"{name} @ {layer}: plain {med['plain'] * 1000:.1f} ms, cutmix {med['cutmix'] * 1000:.1f} ms, "
        f"cutmix / plain = {med['cutmix'] / med['plain']:.3f} (goal <= 1.02)",
        flush=True,
    )
    cost = hook_cost(activation, y, getattr(model, "num_prefix_tokens", 0))
    print(
        f"  the hook's own work on a {tuple(activation.shape)} activation, forward + backward: "
        f"{cost * 1000:.2f} ms = {cost / med['plain']:.4f} of the plain step, "
        f"i.e. cutmix / plain = {1 + cost / med['plain']:.4f} without the noise\n",
        flush=True,
    )


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
