"""Step overhead of mixing at ``layer4`` through a hook, measured side by side in one run.

Three ResNet50 train steps (forward, backward, SGD update) on the same batch, interleaved round by
round so machine noise hits all of them alike:

* plain  — no mixing;
* hooked — ``HookMixer(model, "layer4")``: plan, forward (layer4 mixed), mixed loss;
* timm   — ``timm.data.Mixup`` at the input with ``SoftTargetCrossEntropy`` (the usual input mixup).

Prints the median step times, the ratios hooked/plain and hooked/timm, the extra memory autograd
keeps for backward (bytes of unique saved tensors, the dominant term of a train step's peak memory,
which a CPU has no allocator counter for) against the size of one layer4 activation, and the graph
breaks ``torch._dynamo.explain`` finds in the hooked forward. With ``--device cuda`` the steps run on the GPU
(each timed between two ``torch.cuda.synchronize``) and the card's name is printed.

    python benchmarks/step_overhead.py [--batch 32] [--size 224] [--rounds 5] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Callable

import timm.data
import timm.loss
import torch
import torchvision
from torch import nn

from _timing import interleaved_medians, train_step
from hookmix import HookMixer


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` builds its loss."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(storages.values())


def synced(step: Callable[[], float], device: torch.device) -> Callable[[], float]:
    """``step`` timed from an idle device to the end of its kernels (CUDA runs asynchronously); as is on the CPU."""
    if device.type != "cuda":
        return step

    def timed() -> float:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: not measured on a GPU")
        return
    torch.manual_seed(0)
    model = torchvision.models.resnet50().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    timm_mix = timm.data.Mixup(mixup_alpha=0.4, cutmix_alpha=0.0, num_classes=1000)
    soft_ce = timm.loss.SoftTargetCrossEntropy()

    def plain_loss() -> torch.Tensor:
        return criterion(model(x), y)

    def hooked_loss() -> torch.Tensor:
        step = hooked.plan(y)
        return step.loss(criterion, model(x))

    def timm_loss() -> torch.Tensor:
        xm, ym = timm_mix(x.clone(), y)
        return soft_ce(model(xm), ym)

    model.train()
    with HookMixer(model, "layer4", alpha=0.4, num_classes=1000, seed=0) as hooked:
        variants = {"plain": plain_loss, "hooked": hooked_loss, "timm-input": timm_loss}
        med = interleaved_medians(
            {name: synced(functools.partial(train_step, optimizer, fn), device) for name, fn in variants.items()},
            args.rounds,
        )
        memory = {name: saved_bytes(fn) for name, fn in variants.items()}
        hooked.plan(y[:2])
        explanation = torch._dynamo.explain(model)(x[:2, :, :64, :64])
    layer4_bytes = args.batch * 2048 * (args.size // 32) ** 2 * 4
    extra = memory["hooked"] - memory["plain"]
    print()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU threads={torch.get_num_threads()}"
    print(f"ResNet50 train step, B={args.batch}, {args.size}px, {where}, torch {torch.__version__}, ", end="")
    print(f"median of {args.rounds}:")
    for name, t in med.items():
        print(f"  {name:<11} {t * 1000:8.1f} ms")
    print(f"  hooked / plain      = {med['hooked'] / med['plain']:.3f}   (goal <= 1.02)")
    print(f"  hooked / timm-input = {med['hooked'] / med['timm-input']:.3f}   (goal <= 1.02)")
    print(
        f"  saved-for-backward: plain {memory['plain'] / 2**20:.1f} MiB, hooked {memory['hooked'] / 2**20:.1f} MiB, "
        f"extra {extra / 2**20:.1f} MiB = {extra / layer4_bytes:.2f} x one layer4 activation "
        f"({layer4_bytes / 2**20:.1f} MiB; goal <= 1)"
    )
    print(
        f"  torch._dynamo.explain, hook armed: {explanation.graph_break_count} graph breaks, "
        f"{explanation.graph_count} graphs (goal 0 breaks)"
    )
    for reason in explanation.break_reasons[:3]:
        print(f"    break: {reason.reason}")


if __name__ == "__main__":
    main()
