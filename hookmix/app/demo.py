"""The digits-transfer experiment behind ``make demo`` and ``hookmix finetune --data digits``.

A :class:`~hookmix.app.digits.DigitsCNN` pretrained on digits 0-4 is frozen and cut at its last conv stage
(``stage2``, (B, 64, 2, 2)); its features of digits 5-9 are cached once; for each number of labels per
class ``k``, schedule length and seed, the head is re-initialised and trained on the cached features with
feature mixup and without (same data order, same init, same λ draws left unused). The settings were
chosen for the *baseline* to converge (lr, 100 epochs), not tuned for mixup; the short schedule shows
what users of short runs see.

A second experiment asks whether the head behind the mixed layer matters (:func:`head_experiment`): a fresh
fastai-style MLP head (:func:`hookmix.build_head` ``"mlp"``) is trained on the same cached features
with mixup of the ``(B, 64, 2, 2)`` map before it (``fit(head, "input", ...)``), with mixup of its logits
(``fit(head, "output", ...)``) and without mixup. Behind the model's own pooled linear head the two mixings
are the same computation; behind the MLP they are not.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from hookmix.app.digits import DigitsCNN, digits_transfer, pretrain_source, single_thread
from hookmix.app.mosaics import digits_mosaics
from hookmix.core.checks import check_int
from hookmix.core.files import atomic_write
from hookmix.evaluation.calibration import fit_temperature
from hookmix.evaluation.metrics import evaluate, mean_ci, reliability
from hookmix.graph.splitting import split
from hookmix.headonly.cache import CacheKey, FeatureCache
from hookmix.headonly.heads import build_head
from hookmix.headonly.training import FitConfig, FitResult, fit
from hookmix.mixing.settings import MixSettings

__all__ = [
    "Curves",
    "cross_fitted",
    "format_heads",
    "format_multilabel",
    "format_summary",
    "head_experiment",
    "HEAD_ARMS",
    "LAYER",
    "METRICS",
    "multilabel_experiment",
    "MULTILABEL_METRICS",
    "MultilabelRun",
    "Run",
    "run_demo",
    "summary_rows",
    "transfer_experiment",
]

LAYER = "stage2"
METRICS = ("val_accuracy", "val_nll", "val_ece")
MULTILABEL_METRICS = ("val_map", "val_f1", "val_nll", "val_ece")
HEAD_ARMS = {"none": (False, "input"), "map": (True, "input"), "logits": (True, "output")}
"""The arms of :func:`head_experiment`: (mix, where) for no mixup, mixup of the map before the head, and of
the head's logits."""


@dataclass(frozen=True)
class Run:
    """One trained head: its setting and final validation metrics. ``head`` is the head's kind
    (:data:`hookmix.headonly.heads.HEAD_KINDS`), ``mixed_at`` where :func:`hookmix.fit` mixed (``"input"``:
    the cached map, ``"output"``: the logits; nothing when ``mix`` is false); ``calibrated``: the metrics are
    those of the logits divided by a temperature (:func:`cross_fitted`)."""

    k: int
    epochs: int
    mix: bool
    seed: int
    val_accuracy: float
    val_nll: float
    val_ece: float
    head: str = "model"
    mixed_at: str = "input"
    calibrated: bool = False


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


class _Cached(NamedTuple):
    """The number of classes and the cached train and validation features of one ``digits_transfer(k, seed)``."""

    num_classes: int
    train: FeatureCache
    val: FeatureCache


def _cached(backbone: torch.nn.Module, k: int, seed: int) -> _Cached:
    data = digits_transfer(k, seed)
    train = _features(backbone, data.train_x, data.train_y, f"digits5-9:k{k}:seed{seed}:train")
    val = _features(backbone, data.val_x, data.val_y, f"digits5-9:k{k}:seed{seed}:val")
    return _Cached(data.num_classes, train, val)


def _fit_head(
    head: torch.nn.Module,
    mixed_at: str,
    data: _Cached,
    n_epochs: int,
    mix: bool,
    seed: int,
    alpha: float,
) -> FitResult:
    """Train ``head`` on the cached features with the demo's settings, mixing at ``mixed_at``. The global RNG,
    which dropout in a head draws from, is seeded by ``seed`` and restored afterwards."""
    config = FitConfig(epochs=n_epochs, batch_size=16, lr=3e-2, mixing=MixSettings(alpha=alpha), mix=mix, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fit(
            head,
            mixed_at,
            data.train.features,
            data.train.labels,
            data.val.features[0],
            data.val.labels,
            config,
            num_classes=data.num_classes,
            progress=False,
        )


def cross_fitted(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logits`` divided by a temperature fitted on *other* validation examples: the even rows by the T of the
    odd rows and the odd rows by the T of the even rows (2-fold cross-fitting), so the metrics of the result
    are out-of-sample, on every validation example."""
    scaled = logits.clone()
    rows = torch.arange(len(labels))
    for fit_on, apply_to in ((rows % 2 == 0, rows % 2 == 1), (rows % 2 == 1, rows % 2 == 0)):
        scaled[apply_to] = logits[apply_to] / fit_temperature(logits[fit_on], labels[fit_on])
    return scaled


def _runs(setting: dict[str, Any], result: FitResult, labels: torch.Tensor) -> list[Run]:
    """The :class:`Run` of one trained head, and of its logits temperature-scaled (:func:`cross_fitted`)."""
    calibrated = evaluate(cross_fitted(result.val_logits, labels), labels)
    return [
        Run(**setting, **{m: result.final[m] for m in METRICS}),
        Run(**setting, calibrated=True, **{f"val_{m}": calibrated[m] for m in ("accuracy", "nll", "ece")}),
    ]


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
        data = _cached(backbone, k, seed)
        for mix in (False, True):
            result = _fit_head(_fresh_head(source, seed), "input", data, n_epochs, mix, seed, alpha)
            runs.extend(_runs(dict(k=k, epochs=n_epochs, mix=mix, seed=seed), result, data.val.labels))
            if n_epochs == max(epochs):
                entry = curves.setdefault(f"k={k} {'mixup' if mix else 'no mixup'}", Curves(result.history, [], [], []))
                entry.logits.append(result.val_logits)
                entry.labels.append(data.val.labels)
                entry.lams.extend(result.lams)
    return runs, curves


@single_thread()  # the 512-wide MLP spends 10x longer syncing two threads than computing on a busy machine
def head_experiment(
    k: int = 20, epochs: int = 100, seeds: int = 5, alpha: float = 0.4, progress: bool = True
) -> list[Run]:
    """Train a fresh MLP head (:func:`hookmix.build_head` ``"mlp"``) on the cached ``stage2`` maps of
    ``k`` labels per class for every arm of :data:`HEAD_ARMS` and seed; the arms of one seed share the
    head's initialisation, the data order, the λ draws and the dropout masks' generator. It runs on one CPU
    thread, so its numbers do not depend on the core count."""
    backbone = split(pretrain_source(seed=0), LAYER)[0]
    runs: list[Run] = []
    for seed in tqdm(range(seeds), desc="MLP head: map vs logits", disable=not progress):
        data = _cached(backbone, k, seed)
        for mix, mixed_at in HEAD_ARMS.values():
            head = build_head("mlp", feature_shape=data.train.feature_shape, num_classes=data.num_classes, seed=seed)
            result = _fit_head(head, mixed_at, data, epochs, mix, seed, alpha)
            metrics = {m: result.final[m] for m in METRICS}
            runs.append(Run(k=k, epochs=epochs, mix=mix, seed=seed, head="mlp", mixed_at=mixed_at, **metrics))
    return runs


@dataclass(frozen=True)
class MultilabelRun:
    """One multi-label head on the digit mosaics: its setting and final validation metrics."""

    n_train: int
    epochs: int
    mix: bool
    seed: int
    val_map: float
    val_f1: float
    val_nll: float
    val_ece: float


def multilabel_experiment(
    n_train: int = 300, n_val: int = 300, epochs: int = 100, seeds: int = 5, alpha: float = 0.4, progress: bool = True
) -> list[MultilabelRun]:
    """The multi-label task: 2x2 mosaics of digits (:func:`~hookmix.app.mosaics.digits_mosaics`), labelled with
    the set of digits present. The single-digit CNN, frozen and cut past its average pool, gives (B, 64)
    features; a fresh linear head with 10 sigmoid outputs trains with ``BCEWithLogitsLoss`` on mixed label
    rows, or unmixed (same init, data order and λ draws)."""
    backbone = split(pretrain_source(seed=0), LAYER, past_fixed_ops=True)[0]
    runs: list[MultilabelRun] = []
    for seed in tqdm(range(seeds), desc="multi-label mosaics", disable=not progress):
        task = digits_mosaics(n_train, n_val, seed)
        name = f"mosaics:{n_train}:{n_val}:seed{seed}"
        data = _Cached(
            task.num_classes,
            _features(backbone, task.train_x, task.train_y, f"{name}:train"),
            _features(backbone, task.val_x, task.val_y, f"{name}:val"),
        )
        for mix in (False, True):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                head = torch.nn.Linear(data.train.feature_shape[0], task.num_classes)
            result = _fit_head(head, "input", data, epochs, mix, seed, alpha)
            metrics = {m: result.final[m] for m in MULTILABEL_METRICS}
            runs.append(MultilabelRun(n_train=n_train, epochs=epochs, mix=mix, seed=seed, **metrics))
    return runs


def format_multilabel(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`multilabel_experiment` as a Markdown table (mean ± 95% CI over seeds)."""
    lines = [
        "| train mosaics | epochs | mixup | mAP (macro) | F1@0.5 (macro) | NLL (BCE) | ECE (mean per label) |",
        "|---:|---:|:---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = _cells(r, MULTILABEL_METRICS)
        lines.append(f"| {r['n_train']} | {r['epochs']} | {'yes' if r['mix'] else 'no'} | " + cells)
    return "\n".join(lines)


def summary_rows(runs: Sequence[Any], metrics: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """Mean and 95% CI half-width over seeds of each of ``metrics``, per setting (every field of the run
    dataclass but the seed and the metrics), in the order the settings first appear."""
    groups: dict[tuple[tuple[str, Any], ...], list[dict[str, Any]]] = {}
    for run in runs:
        fields = asdict(run)
        setting = tuple((name, value) for name, value in fields.items() if name != "seed" and name not in metrics)
        groups.setdefault(setting, []).append(fields)
    rows = []
    for setting, members in groups.items():
        row: dict[str, Any] = {**dict(setting), "seeds": len(members)}
        for metric in metrics:
            mean, half = mean_ci([member[metric] for member in members])
            row[metric] = mean
            row[f"{metric}_ci95"] = half
        rows.append(row)
    return rows


def _cells(row: dict[str, Any], metrics: Sequence[str] = METRICS) -> str:
    return " | ".join(f"{row[m]:.3f} ± {row[f'{m}_ci95']:.3f}" for m in metrics) + " |"


def format_summary(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (mean ± 95% CI over seeds)."""
    lines = [
        "| k/class | epochs | mixup | accuracy | NLL | ECE |",
        "|---:|---:|:---:|---:|---:|---:|",
    ]
    for r in rows:
        mixup = ("yes" if r["mix"] else "no") + (" + T" if r["calibrated"] else "")
        lines.append(f"| {r['k']} | {r['epochs']} | {mixup} | " + _cells(r))
    return "\n".join(lines)


def format_heads(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`head_experiment` as a Markdown table (mean ± 95% CI over seeds), one per arm."""
    arms = {setting: arm for arm, setting in HEAD_ARMS.items()}
    lines = [
        "| head | k/class | epochs | mixup of | accuracy | NLL | ECE |",
        "|:---|---:|---:|:---|---:|---:|---:|",
    ]
    for r in rows:
        arm = arms[r["mix"], r["mixed_at"]]
        lines.append(f"| {r['head']} | {r['k']} | {r['epochs']} | {arm} | " + _cells(r))
    return "\n".join(lines)


def run_demo(
    out_dir: str | Path,
    seeds: int = 5,
    alpha: float = 0.4,
    ks: Sequence[int] = (5, 20),
    epochs: Sequence[int] = (30, 100),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run :func:`transfer_experiment` and :func:`head_experiment` (the largest ``k``, the longest schedule),
    print their tables, write ``metrics.json`` (``summary`` / ``runs``, and ``heads``) and the PNG plots;
    return the summary rows of both. ``seeds`` must be at least 2: the tables report a 95% CI over seeds, which
    one seed cannot give (it would print ``± nan`` and ``metrics.json`` would not be JSON)."""
    from hookmix.evaluation.plots import plot_history, plot_lambda_hist, plot_reliability

    check_int("seeds", seeds, 2, ": the tables give mean ± 95% CI over seeds, and one seed has no spread")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, curves = transfer_experiment(ks, epochs, seeds, alpha, progress)
    head_runs = head_experiment(max(ks), max(epochs), seeds, alpha, progress)
    multilabel_runs = multilabel_experiment(epochs=max(epochs), seeds=seeds, alpha=alpha, progress=progress)
    rows, head_rows = summary_rows(runs), summary_rows(head_runs)
    multilabel_rows = summary_rows(multilabel_runs, MULTILABEL_METRICS)
    print(f"digits transfer: frozen CNN (digits 0-4) cut at {LAYER!r}, head trained on digits 5-9, alpha={alpha}")
    print(format_summary(rows))
    print(
        f"\nthe head behind the mix: a fresh MLP head (fastai's create_head) on the {LAYER!r} maps, mixup of the "
        "map before it vs of its logits"
    )
    print(format_heads(head_rows))
    print(
        "\nmulti-label: 2x2 digit mosaics labelled with the digits present; the frozen CNN's pooled stage2 "
        "features, a linear head with BCE"
    )
    print(format_multilabel(multilabel_rows))
    payload = {
        "alpha": alpha,
        "layer": LAYER,
        "summary": rows,
        "runs": [asdict(r) for r in runs],
        "heads": {"summary": head_rows, "runs": [asdict(r) for r in head_runs]},
        "multilabel": {"summary": multilabel_rows, "runs": [asdict(r) for r in multilabel_runs]},
    }
    atomic_write(out / "metrics.json", json.dumps(payload, indent=1, allow_nan=False).encode())  # strict JSON
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
    return rows + head_rows + multilabel_rows
