"""The digits-transfer experiment behind ``make demo`` and ``hookmix finetune --data digits``.

A :class:`~hookmix.app.digits.DigitsCNN` pretrained on digits 0-4 is frozen and cut at its last conv stage
(``stage2``, (B, 64, 2, 2)); its features of digits 5-9 are cached once; for each number of labels per
class ``k``, schedule length and seed, the head is re-initialised and trained on the cached features with
feature mixup and without (same data order, same init, same λ draws left unused). The settings were
chosen for the *baseline* to converge (lr, 100 epochs), not tuned for mixup; the short schedule shows
what users of short runs see.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from hookmix._io import atomic_write
from hookmix.app.digits import DigitsCNN, digits_transfer, pretrain_source
from hookmix.cache import CacheKey, FeatureCache
from hookmix.finetune import FitConfig, fit
from hookmix.metrics import mean_ci, reliability
from hookmix.settings import MixSettings
from hookmix.splitting import split

__all__ = ["Curves", "format_summary", "LAYER", "METRICS", "Run", "run_demo", "summary_rows", "transfer_experiment"]

LAYER = "stage2"
METRICS = ("val_accuracy", "val_nll", "val_ece")


@dataclass(frozen=True)
class Run:
    """One trained head: its setting and final validation metrics."""

    k: int
    epochs: int
    mix: bool
    seed: int
    val_accuracy: float
    val_nll: float
    val_ece: float


def _fresh_head(source: DigitsCNN, seed: int) -> torch.nn.Module:
    """The source model's head, cut at ``stage2``, with its classifier re-initialised from ``seed``."""
    model = copy.deepcopy(source)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.head[-1].reset_parameters()
    return split(model, LAYER)[1]


def _features(backbone: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, split_name: str) -> FeatureCache:
    key = CacheKey("hookmix:digits-cnn", LAYER, tuple(x.shape[1:]), "digits/16", split_name)
    return FeatureCache.extract(backbone, TensorDataset(x, y), key, progress=False)


@dataclass
class Curves:
    """What the plots need from one setting of the longest schedule: seed 0's history, the validation
    logits and labels pooled over seeds, and the λ drawn over all seeds."""

    history: list[dict[str, float]]
    logits: list[torch.Tensor]
    labels: list[torch.Tensor]
    lams: list[float]


def transfer_experiment(
    ks: Sequence[int] = (5, 20),
    epochs: Sequence[int] = (30, 100),
    seeds: int = 5,
    alpha: float = 0.4,
    progress: bool = True,
) -> tuple[list[Run], dict[str, Curves]]:
    """Train mixed and unmixed heads for every ``k`` x schedule x seed.

    Returns the runs and, for the longest schedule, the :class:`Curves` of each setting keyed by
    ``"k=5 mixup"`` / ``"k=5 no mixup"``.
    """
    source = pretrain_source(seed=0)
    backbone = split(source, LAYER)[0]
    runs: list[Run] = []
    curves: dict[str, Curves] = {}
    settings = [(k, e, s) for k in ks for e in epochs for s in range(seeds)]
    for k, n_epochs, seed in tqdm(settings, desc="digits transfer", disable=not progress):
        data = digits_transfer(k, seed)
        train = _features(backbone, data.train_x, data.train_y, f"digits5-9:k{k}:seed{seed}:train")
        val = _features(backbone, data.val_x, data.val_y, f"digits5-9:k{k}:seed{seed}:val")
        for mix in (False, True):
            mixing = MixSettings(alpha=alpha)
            config = FitConfig(epochs=n_epochs, batch_size=16, lr=3e-2, mixing=mixing, mix=mix, seed=seed)
            result = fit(
                _fresh_head(source, seed),
                "input",
                train.features,
                train.labels,
                val.features[0],
                val.labels,
                config,
                num_classes=data.num_classes,
                progress=False,
            )
            runs.append(Run(k=k, epochs=n_epochs, mix=mix, seed=seed, **{m: result.final[m] for m in METRICS}))
            if n_epochs == max(epochs):
                entry = curves.setdefault(f"k={k} {'mixup' if mix else 'no mixup'}", Curves(result.history, [], [], []))
                entry.logits.append(result.val_logits)
                entry.labels.append(val.labels)
                entry.lams.extend(result.lams)
    return runs, curves


def summary_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Mean and 95% CI half-width over seeds of each metric, per (k, epochs, mix)."""
    groups: dict[tuple[int, int, bool], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.k, run.epochs, run.mix), []).append(run)
    rows = []
    for (k, epochs, mix), members in groups.items():
        row: dict[str, Any] = {"k": k, "epochs": epochs, "mix": mix, "seeds": len(members)}
        for metric in METRICS:
            mean, half = mean_ci([getattr(r, metric) for r in members])
            row[metric] = mean
            row[f"{metric}_ci95"] = half
        rows.append(row)
    return rows


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (mean ± 95% CI over seeds)."""
    lines = [
        "| k/class | epochs | mixup | accuracy | NLL | ECE |",
        "|---:|---:|:---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{r[m]:.3f} ± {r[f'{m}_ci95']:.3f}" for m in METRICS]
        lines.append(f"| {r['k']} | {r['epochs']} | {'yes' if r['mix'] else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(
    out_dir: str | Path,
    seeds: int = 5,
    alpha: float = 0.4,
    ks: Sequence[int] = (5, 20),
    epochs: Sequence[int] = (30, 100),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run :func:`transfer_experiment`, print the table, write ``metrics.json`` and the PNG plots."""
    from hookmix.plots import plot_history, plot_lambda_hist, plot_reliability

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, curves = transfer_experiment(ks, epochs, seeds, alpha, progress)
    rows = summary_rows(runs)
    table = format_summary(rows)
    print(f"digits transfer: frozen CNN (digits 0-4) cut at {LAYER!r}, head trained on digits 5-9, alpha={alpha}")
    print(table)
    payload = {"alpha": alpha, "layer": LAYER, "summary": rows, "runs": [asdict(r) for r in runs]}
    atomic_write(out / "metrics.json", json.dumps(payload, indent=1).encode())
    for k in sorted({r.k for r in runs}):
        pair = {label: c for label, c in curves.items() if label.startswith(f"k={k} ")}
        plot_history({label: c.history for label, c in pair.items()}, out / f"curves_k{k}.png")
        plot_reliability(
            {label: reliability(torch.cat(c.logits), torch.cat(c.labels)) for label, c in pair.items()},
            out / f"reliability_k{k}.png",
        )
    lams = torch.tensor([lam for c in curves.values() for lam in c.lams])
    plot_lambda_hist(lams, out / "lambda_hist.png", alpha=alpha)
    print(f"wrote {out / 'metrics.json'} and plots (curves_k*.png, reliability_k*.png, lambda_hist.png)")
    return rows
