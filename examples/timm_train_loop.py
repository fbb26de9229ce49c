"""timm's train loop with the mix moved from the input to a layer: ``x, y = mixup_fn(x, y)`` unchanged.

Trains a random-init timm ResNet on scikit-learn's bundled digits 0-4 (offline, upsampled to 32 px) with
the loop of timm's ``train.py``: ``HookMixup`` takes timm's ``Mixup`` arguments, returns the input
untouched with soft targets, and the hooked layer is mixed in the forward; the loss is timm's
``SoftTargetCrossEntropy``.

    python examples/timm_train_loop.py --layer layer2 --mixup 0.4 --epochs 3
"""

from __future__ import annotations

import argparse

import timm
import timm.loss
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hookmix.app.digits import source_split
from hookmix.integrations.timm import HookMixup


def train_one_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, mixup_fn: HookMixup
) -> float:
    """timm's ``train_one_epoch`` core; returns the mean training loss (on mixed targets)."""
    model.train()
    total, count = 0.0, 0
    for x, y in loader:
        x, y = mixup_fn(x, y)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, count = total + loss.item() * len(y), count + len(y)
    return total / count


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet10t", help="timm model name (random init)")
    parser.add_argument("--layer", default="layer2", help="layer to mix (see `hookmix layers`)")
    parser.add_argument("--mixup", type=float, default=0.4, help="mixup alpha (timm --mixup)")
    parser.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha at the layer (timm --cutmix)")
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (timm --smoothing)")
    parser.add_argument("--mixup-off-epoch", type=int, default=0, help="stop mixing from this epoch (0: never)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=0, help="use only this many training images (0: all)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    split = source_split()
    size = (args.img_size, args.img_size)
    train_x = F.interpolate(split.train_x, size=size, mode="bilinear")
    val_x = F.interpolate(split.val_x, size=size, mode="bilinear")
    train_y = split.train_y
    if args.samples:
        train_x, train_y = train_x[: args.samples], train_y[: args.samples]
    loader = DataLoader(
        TensorDataset(train_x, train_y),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )

    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, num_classes=split.num_classes, in_chans=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    mixup_args = dict(
        mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing, num_classes=split.num_classes
    )
    with HookMixup(model, args.layer, seed=args.seed, **mixup_args) as mixup_fn:
        for epoch in range(args.epochs):
            if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                mixup_fn.mixup_enabled = False
            loss = train_one_epoch(model, loader, optimizer, timm.loss.SoftTargetCrossEntropy(), mixup_fn)
            print(f"epoch {epoch}: train loss {loss:.4f}, val accuracy {accuracy(model, val_x, split.val_y):.3f}")


if __name__ == "__main__":
    main()
