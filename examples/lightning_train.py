"""Lightning 2.x with feature mixup: ``HookMixCallback`` arms each training batch, ``training_step`` mixes the loss.

Trains a random-init :class:`hookmix.app.digits.DigitsCNN` on scikit-learn's bundled digits 0-4 (offline) with
a real ``Trainer``; validation is never mixed. Checkpoints hold the mixer's generator, so
``--resume PATH`` continues with the plans the uninterrupted run would have drawn.

    python examples/lightning_train.py --layer stage1 --alpha 0.4 --epochs 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from hookmix.app.digits import DigitsCNN, source_split
from hookmix.integrations.lightning import HookMixCallback


class DigitsClassifier(pl.LightningModule):
    """``DigitsCNN`` as a LightningModule; the callback lives on the module (``configure_callbacks``)."""

    def __init__(self, layer: str, alpha: float, num_classes: int, seed: int, lr: float) -> None:
        super().__init__()
        self.net = DigitsCNN(num_classes=num_classes)
        self.mix = HookMixCallback(layer, module="net", alpha=alpha, num_classes=num_classes, seed=seed)
        self.lr = lr

    def configure_callbacks(self) -> list[pl.Callback]:
        return [self.mix]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, _ = batch
        loss = self.mix.step.loss(F.cross_entropy, self.net(x))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", default="stage1", help="DigitsCNN layer to mix: stem, stage1 or stage2")
    parser.add_argument("--alpha", type=float, default=0.4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=0, help="use only this many training images (0: all)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("lightning_out"), help="checkpoints go here")
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint to resume from")
    args = parser.parse_args()

    split = source_split()
    train_x, train_y = split.train_x, split.train_y
    if args.samples:
        train_x, train_y = train_x[: args.samples], train_y[: args.samples]
    train = DataLoader(
        TensorDataset(train_x, train_y),
        batch_size=args.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    val = DataLoader(TensorDataset(split.val_x, split.val_y), batch_size=256)
    pl.seed_everything(args.seed, verbose=False)
    model = DigitsClassifier(args.layer, args.alpha, split.num_classes, args.seed, args.lr)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=args.out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train, val, ckpt_path=args.resume)
    print(
        f"val accuracy {trainer.callback_metrics['val_acc']:.3f} after {args.epochs} epochs; "
        f"checkpoints in {args.out / 'checkpoints'}"
    )


if __name__ == "__main__":
    main()
