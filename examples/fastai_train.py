"""fastai 2.x with feature mixup: ``Learner(dls, model, cbs=HookMixUp("stage1", alpha=0.4))``.

Trains a random-init :class:`hookmix.app.digits.DigitsCNN` on scikit-learn's bundled digits 0-4 (offline) with
``fit_one_cycle``; ``HookMixUp`` mixes the named layer and the loss like fastai's ``MixUp`` mixes the
input, and validation runs unmixed.

    python examples/fastai_train.py --layer stage1 --alpha 0.4 --epochs 3
"""

from __future__ import annotations

import argparse

import torch
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (adds Learner.fit_one_cycle)
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy

from hookmix.app.digits import DigitsCNN, source_split
from hookmix.integrations.fastai import HookMixUp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", default="stage1", help="DigitsCNN layer to mix: stem, stage1 or stage2")
    parser.add_argument("--alpha", type=float, default=0.4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=0, help="use only this many training images (0: all)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    split = source_split()
    train = list(zip(split.train_x, split.train_y))
    if args.samples:
        train = train[: args.samples]
    dls = DataLoaders.from_dsets(train, list(zip(split.val_x, split.val_y)), bs=args.batch_size, device="cpu")
    torch.manual_seed(args.seed)
    learn = Learner(
        dls,
        DigitsCNN(num_classes=split.num_classes),
        loss_func=CrossEntropyLossFlat(),
        metrics=accuracy,
        cbs=HookMixUp(args.layer, alpha=args.alpha, seed=args.seed),
    )
    learn.fit_one_cycle(args.epochs, args.lr)
    _, val_accuracy = learn.validate()
    print(f"val accuracy {val_accuracy:.3f} after {args.epochs} epochs")


if __name__ == "__main__":
    main()
