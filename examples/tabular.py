"""Tabular mixup as the fastai forum thread describes it: mix each categorical column's embedding and the
continuous columns directly, with one plan, in one forward.

Data (offline): scikit-learn's breast-cancer table (569 rows, 30 numeric columns, 2 classes). To get
categorical columns, the first ``--categorical`` columns are binned into 5 quantile bins (bin edges from
the training rows only) and fed through one ``nn.Embedding`` each; the other columns are standardised
and fed as a continuous block. The model is plain PyTorch: embeddings + a linear layer on the continuous
block, concatenated, then an MLP.

Mixing: ``HookMixer(model, ["embeds.*", "input"], mode="all")`` mixes every embedding's output and the
continuous input tensor (integer category codes are never mixed) with the same λ and partners. The same
layer spec works on fastai's ``TabularModel`` (its embeddings are ``embeds.0``, ``embeds.1``, ...; its
forward takes ``(x_cat, x_cont)`` too): ``--fastai`` trains that model instead when fastai is installed.

    python examples/tabular.py --seeds 5 --epochs 60
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from hookmix import HookMixer, evaluate, mean_ci

BINS = 5


class TabularNet(nn.Module):
    """Embeddings for categorical columns + a linear layer for the continuous block, then an MLP."""

    def __init__(self, n_categorical: int, n_continuous: int, n_classes: int, emb_dim: int = 4) -> None:
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(BINS, emb_dim) for _ in range(n_categorical))
        self.cont = nn.Linear(n_continuous, 16)
        self.mlp = nn.Sequential(nn.Linear(emb_dim * n_categorical + 16, 32), nn.ReLU(), nn.Linear(32, n_classes))

    def forward(self, x_cat: torch.Tensor, x_cont: torch.Tensor) -> torch.Tensor:
        emb = [embed(x_cat[:, i]) for i, embed in enumerate(self.embeds)]
        return self.mlp(torch.cat([*emb, self.cont(x_cont)], dim=1))


def load_table(n_categorical: int, seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Train / validation tensors ``(x_cat (N, K) int64, x_cont (N, 30-K) float32, y (N,))``, 80/20 split."""
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer()
    x = torch.tensor(table.data, dtype=torch.float32)
    y = torch.tensor(table.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    train, val = order[:cut], order[cut:]
    edges = torch.quantile(x[train, :n_categorical], torch.linspace(0, 1, BINS + 1)[1:-1], dim=0).T
    x_cat = torch.stack([torch.bucketize(x[:, i].contiguous(), edges[i]) for i in range(n_categorical)], dim=1)
    cont = x[:, n_categorical:]
    cont = (cont - cont[train].mean(0)) / cont[train].std(0)
    return (x_cat[train], cont[train], y[train]), (x_cat[val], cont[val], y[val])


def build_model(n_categorical: int, n_continuous: int, use_fastai: bool) -> nn.Module:
    if not use_fastai:
        return TabularNet(n_categorical, n_continuous, 2)
    from fastai.tabular.model import TabularModel

    return TabularModel([(BINS, 4)] * n_categorical, n_continuous, 2, layers=[32])


def train_once(args: argparse.Namespace, seed: int, mix: bool) -> dict[str, float]:
    (c_tr, x_tr, y_tr), (c_va, x_va, y_va) = load_table(args.categorical, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(args.categorical, x_tr.shape[1], args.fastai)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    criterion = nn.CrossEntropyLoss()
    order_gen = torch.Generator().manual_seed(seed)
    with HookMixer(model, ["embeds.*", "input"], mode="all", alpha=args.alpha, prob=float(mix), seed=seed) as mixer:
        for _ in range(args.epochs):
            model.train()
            order = torch.randperm(len(y_tr), generator=order_gen)
            for i in range(0, len(order), args.batch_size):
                idx = order[i : i + args.batch_size]
                step = mixer.plan(y_tr[idx])
                loss = step.loss(criterion, model(c_tr[idx], x_tr[idx]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            return evaluate(model(c_va, x_va), y_va)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=0.4)
    parser.add_argument("--categorical", type=int, default=6, help="columns binned into categories")
    parser.add_argument("--fastai", action="store_true", help="use fastai's TabularModel (needs fastai)")
    args = parser.parse_args(argv)
    print(
        f"breast-cancer table, {args.categorical} binned columns + {30 - args.categorical} continuous, "
        f"{'fastai TabularModel' if args.fastai else 'plain PyTorch model'}, {args.seeds} seeds, "
        f"{args.epochs} epochs, mean ± 95% CI"
    )
    print("| mixup | accuracy | NLL | ECE |\n|:---:|---:|---:|---:|")
    for mix in (False, True):
        runs = [train_once(args, seed, mix) for seed in range(args.seeds)]
        cells = []
        for metric in ("accuracy", "nll", "ece"):
            mean, half = mean_ci([r[metric] for r in runs])
            cells.append(f"{mean:.3f} ± {half:.3f}")
        print(f"| {'yes' if mix else 'no'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
