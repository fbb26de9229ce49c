"""A sweep: a grid of heads (α × cutmix α × lr × seed) trained together on one cache, and what it says.

Every cell is the run :func:`hookmix.fit` would make alone with its :class:`~hookmix.FitConfig`: the data
order and views, the mix plans, the head's init and dropout masks, AdamW with a per-step cosine schedule.
What differs is the loop: :class:`~hookmix.headonly.stacked.StackedGrid` trains the heads of one structure
together (stacked parameters and BatchNorm statistics, ``vmap``, one AdamW), for multi-class and multi-label
targets, mixup and CutMix. The results equal ``fit``'s up to float rounding (``tests/headonly/test_sweep.py``
measures it). A grid that does not stack (a streamed cache, label smoothing or excluded classes, a head whose
dropout is not an ``nn.Dropout`` at the top level of an ``nn.Sequential``) is trained cell by cell with ``fit``
itself: the same results, without the speed-up (:func:`stackable` says which and why).

:func:`paired_differences` turns the cells into the answer: per layer, head and lr, each (α, cutmix α) against
the baseline (α = 0, cutmix α = 0) on the same seed, with a 95% CI over seeds (:func:`hookmix.mean_ci`) and a
one-line verdict per metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from hookmix.core.checks import check_int
from hookmix.core.errors import UsageError
from hookmix.evaluation.metrics import mean_ci
from hookmix.headonly.heads import build_head
from hookmix.headonly.stacked import StackedGrid, dropout_segments
from hookmix.headonly.streaming import ShardedFeatures
from hookmix.headonly.tasks import task_of
from hookmix.headonly.training import FitConfig, FitResult, fit

__all__ = [
    "cell_alpha",
    "cell_cutmix_alpha",
    "cell_record",
    "fit_grid",
    "grid_configs",
    "grid_unstacked",
    "paired_differences",
    "stackable",
    "summary",
    "sweep",
    "SweepResult",
    "verdicts",
    "warnings_of",
]

HIGHER_IS_BETTER = {"val_accuracy": True, "val_map": True, "val_f1": True, "val_nll": False, "val_ece": False}
"""The metrics a sweep compares, and which way is better."""

_SHARED = ("epochs", "batch_size", "eval_batch_size")


def grid_configs(
    base: FitConfig,
    alphas: Sequence[float],
    lrs: Sequence[float],
    seeds: Sequence[int],
    cutmix_alphas: Sequence[float] = (0.0,),
) -> list[FitConfig]:
    """One :class:`FitConfig` per cell (α, cutmix α) × lr × seed of ``base``, α and cutmix α each over their
    list and 0. The baseline (α = 0, cutmix α =
    0: ``mix=False``, as ``finetune --no-mix``) is always included and first; every other pair mixes with
    ``base.mixing`` at those α (both > 0: each step draws mixup or CutMix with ``switch_prob``)."""
    if not alphas or not lrs or not seeds or not cutmix_alphas:
        raise UsageError(
            f"alphas={list(alphas)}, cutmix_alphas={list(cutmix_alphas)}, lrs={list(lrs)} and seeds={list(seeds)} "
            "must each list one value or more."
        )
    pairs = [(a, c) for a in sorted({0.0, *map(float, alphas)}) for c in sorted({0.0, *map(float, cutmix_alphas)})]
    configs = []
    for alpha, cutmix in pairs:
        mix = (alpha, cutmix) != (0.0, 0.0)
        mixing = replace(base.mixing, alpha=alpha, cutmix_alpha=cutmix) if mix else base.mixing
        for lr in dict.fromkeys(float(v) for v in lrs):
            configs.extend(replace(base, mixing=mixing, mix=mix, lr=lr, seed=seed) for seed in dict.fromkeys(seeds))
    return configs


def cell_alpha(config: FitConfig) -> float:
    """The α of a cell: 0 for the no-mixup baseline."""
    return config.mixing.alpha if config.mix else 0.0


def cell_cutmix_alpha(config: FitConfig) -> float:
    """The cutmix α of a cell: 0 for the baseline and mixup alone."""
    return config.mixing.cutmix_alpha if config.mix else 0.0


def stackable(head: nn.Module, config: FitConfig, train_inputs: Any, train_labels: torch.Tensor) -> str:
    """Why the cells of ``head`` and ``config`` cannot be trained stacked (``""``: they can)."""
    if dropout_segments(head) is None:
        return "the head has dropout other than nn.Dropout at the top level of an nn.Sequential"
    if isinstance(train_inputs, ShardedFeatures):
        return "the training features are streamed from disk"
    task_of(train_labels, "train_labels")
    mixing = config.mixing
    if config.mix and (mixing.label_smoothing or mixing.exclude_classes):
        return "label smoothing or excluded classes"
    return ""


def grid_unstacked(
    heads: Sequence[nn.Module], configs: Sequence[FitConfig], train_inputs: Any, train_labels: torch.Tensor
) -> str:
    """Why :func:`fit_grid` trains these cells one by one with ``fit`` (``""``: they are stacked)."""
    if len({_structure(h) for h in heads}) > 1:
        return "the heads are of different structures"
    reasons = sorted({stackable(h, c, train_inputs, train_labels) for h, c in zip(heads, configs)} - {""})
    return "; ".join(reasons)


def _structure(head: nn.Module) -> tuple[Any, ...]:
    """What must agree for heads to run as one stacked module: each submodule's class — for a torch.fx
    ``GraphModule`` (what :func:`hookmix.split` returns), its generated code, since every copy of one gets a
    class of its own — and every parameter's and buffer's name and shape."""
    kinds = tuple(
        (name, module.code if isinstance(module, fx.GraphModule) else type(module))
        for name, module in head.named_modules()
    )
    return kinds, tuple((name, tuple(value.shape)) for name, value in head.state_dict().items())


def _check_grid(heads: Sequence[nn.Module], configs: Sequence[FitConfig]) -> None:
    if len(heads) != len(configs) or not configs:
        raise UsageError(f"give one head per config: {len(heads)} heads for {len(configs)} configs.")
    if len({id(h) for h in heads}) != len(heads):
        raise UsageError("heads holds the same module twice; give each cell its own head (copy.deepcopy).")
    for name in _SHARED:
        values = {getattr(c, name) for c in configs}
        if len(values) > 1:
            raise UsageError(f"the cells of one grid share {name}, got {sorted(values)}; sweep them in separate grids.")


def fit_grid(
    heads: Sequence[nn.Module],
    configs: Sequence[FitConfig],
    train_inputs: torch.Tensor | ShardedFeatures,
    train_labels: torch.Tensor,
    val_inputs: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    num_classes: int,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[FitResult]:
    """Train ``heads[i]`` with ``configs[i]`` on the cached features, all cells together when they stack.

    Each head ends trained in place, and ``FitResult`` i is what ``fit(heads[i], "input", ..., configs[i])``
    returns (history per epoch, λ of the mixed steps, the last validation logits). The configs share
    ``epochs``, ``batch_size`` and ``eval_batch_size``; lr, weight decay, seed and mixing vary per cell.
    """
    _check_grid(heads, configs)
    if grid_unstacked(heads, configs, train_inputs, train_labels):
        return [
            fit(
                h,
                "input",
                train_inputs,
                train_labels,
                val_inputs,
                val_labels,
                c,
                num_classes=num_classes,
                device=device,
                progress=False,
            )
            for h, c in tqdm(list(zip(heads, configs)), desc="cells", disable=not progress, leave=False)
        ]
    return StackedGrid(heads, configs, num_classes, device).train(
        train_inputs, train_labels, val_inputs, val_labels, progress
    )


def cell_record(layer: str, head: str, config: FitConfig, result: FitResult, labels: torch.Tensor) -> dict[str, Any]:
    """One row of a sweep: the cell (layer, head, α, cutmix α, lr, seed) and its final epoch — training loss,
    validation metrics, and the mean confidence (top probability) beside the accuracy, for the calibration
    gap. ``labels`` are the validation labels (multi-class: the confidence is computed; else ``None``)."""
    final = dict(result.final)
    confidence = None
    if result.val_logits is not None and labels.dim() == 1:
        confidence = float(torch.softmax(result.val_logits.double(), 1).max(1).values.mean())
    return {
        "layer": layer,
        "head": head,
        "alpha": cell_alpha(config),
        "cutmix_alpha": cell_cutmix_alpha(config),
        "lr": config.lr,
        "seed": config.seed,
        "epochs": config.epochs,
        **{k: v for k, v in final.items() if k not in ("epoch", "lr")},
        "val_confidence": confidence,
    }


def _arm(record: dict[str, Any]) -> tuple[Any, ...]:
    """What a cell is compared within: its layer, head and lr (the mixing and the seed vary)."""
    return record["layer"], record["head"], record["lr"]


def _mixing(record: dict[str, Any]) -> tuple[float, float]:
    """A cell's (α, cutmix α); (0, 0) is the baseline."""
    return record["alpha"], record["cutmix_alpha"]


def _where(alpha: float, cutmix: float, layer: str, head: str, lr: float) -> str:
    """``α=0.4 at layer4 (linear, lr 0.003)``, with ``cutmix α=1`` when the cell cuts."""
    mixing = " ".join(([f"α={alpha:g}"] if alpha or not cutmix else []) + ([f"cutmix α={cutmix:g}"] if cutmix else []))
    return f"{mixing} at {layer} ({head}, lr {lr:g})"


def _metrics(records: Sequence[dict[str, Any]]) -> list[str]:
    return [m for m in HIGHER_IS_BETTER if records and m in records[0]]


def paired_differences(records: Sequence[dict[str, Any]], level: float = 0.95) -> list[dict[str, Any]]:
    """Per layer, head, lr and mixing (α, cutmix α) other than the baseline (0, 0): the mean over seeds of
    (metric of the cell − metric of the baseline, same seed) and its ``level`` CI (:func:`hookmix.mean_ci`;
    NaN half-width with one seed), for each metric."""
    baseline = {(*_arm(r), r["seed"]): r for r in records if _mixing(r) == (0.0, 0.0)}
    arms: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        if _mixing(r) != (0.0, 0.0) and (*_arm(r), r["seed"]) in baseline:
            arms.setdefault((*_arm(r), *_mixing(r)), []).append(r)
    rows = []
    for (layer, head, lr, alpha, cutmix), members in arms.items():
        for metric in _metrics(records):
            diffs = [m[metric] - baseline[(*_arm(m), m["seed"])][metric] for m in members]
            mean, half = mean_ci(diffs, level)
            cell = {"layer": layer, "head": head, "lr": lr, "cutmix_alpha": cutmix, "alpha": alpha}
            rows.append(
                {
                    **cell,
                    "metric": metric,
                    "seeds": len(diffs),
                    "mean": mean,
                    "half_width": half,
                    "low": mean - half,
                    "high": mean + half,
                }
            )
    return rows


def _name(metric: str) -> str:
    return {"val_accuracy": "accuracy", "val_nll": "NLL", "val_ece": "ECE", "val_map": "mAP", "val_f1": "F1"}[metric]


def verdicts(differences: Sequence[dict[str, Any]]) -> list[str]:
    """One line per row of :func:`paired_differences`, e.g. ``α=0.4 at layer4 (linear, lr 0.003): NLL
    −0.0500 [−0.0800, −0.0200] better than no mixing`` or ``... accuracy +0.0100 [−0.0200, +0.0400] within
    noise`` (``cutmix α=1 at ...`` for a CutMix cell; every cell is compared with the same seed's cell without
    mixing, α = cutmix α = 0)."""
    lines = []
    for row in differences:
        where = _where(row["alpha"], row["cutmix_alpha"], row["layer"], row["head"], row["lr"])
        shown = f"{_name(row['metric'])} {row['mean']:+.4f}"
        if math.isnan(row["half_width"]):
            lines.append(f"{where}: {shown} (one seed: no interval; give --seeds 3 or more)")
            continue
        interval = f"[{row['low']:+.4f}, {row['high']:+.4f}]"
        if row["low"] <= 0 <= row["high"]:
            judged = "within noise"
        else:
            better = (row["low"] > 0) == HIGHER_IS_BETTER[row["metric"]]
            judged = "better than no mixing" if better else "worse than no mixing"
        lines.append(f"{where}: {shown} {interval} {judged}")
    return lines


def warnings_of(records: Sequence[dict[str, Any]]) -> list[str]:
    """The warning signs of a sweep, per layer, head, lr and mixing (means over seeds): a mixed cell whose final
    training loss is above its validation loss (the mixed targets are harder than the data: lower α), and
    under-confidence (accuracy above the mean confidence: the calibration gap's sign; ``--calibrate``)."""
    arms: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        arms.setdefault((*_arm(r), *_mixing(r)), []).append(r)
    lines = []
    for (layer, head, lr, alpha, cutmix), members in arms.items():
        where = _where(alpha, cutmix, layer, head, lr)
        train = math.fsum(m["train_loss"] for m in members) / len(members)
        val = math.fsum(m["val_nll"] for m in members) / len(members)
        if (alpha, cutmix) != (0.0, 0.0) and train > val:
            lines.append(
                f"{where}: training loss {train:.4f} above validation loss {val:.4f} at the end: the mixed targets "
                "are harder than the data; try a lower α"
            )
        gaps = [m["val_accuracy"] - m["val_confidence"] for m in members if m.get("val_confidence") is not None]
        if len(gaps) > 1 and (gap := mean_ci(gaps))[0] - gap[1] > 0:  # accuracy above confidence beyond noise
            lines.append(
                f"{where}: under-confident (accuracy {gap[0]:+.4f} ± {gap[1]:.4f} above the mean confidence): "
                "fit a temperature with finetune --calibrate"
            )
    return lines


def summary(records: Sequence[dict[str, Any]], level: float = 0.95) -> dict[str, Any]:
    """The answer of a sweep: the paired differences against α = 0, their verdicts and the warnings."""
    differences = paired_differences(records, level)
    return {"differences": differences, "verdicts": verdicts(differences), "warnings": warnings_of(records)}


@dataclass
class SweepResult:
    """What :func:`sweep` returns.

    Attributes:
        records: one row per cell (:func:`cell_record`): layer, head, α, cutmix α, lr, seed, epochs, the final
            training loss and validation metrics (accuracy, NLL, ECE; multi-label: mAP, F1, NLL, ECE).
        summary: :func:`summary` of the records: ``differences`` (paired against the baseline, 95% CIs),
            ``verdicts`` (one line per metric) and ``warnings``.
        cells: per layer, each cell's config, trained head and :class:`FitResult` (in the records' order).
    """

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    cells: dict[str, list[tuple[FitConfig, nn.Module, FitResult]]] = field(default_factory=dict)

    def best(self, metric: str = "val_nll") -> tuple[str, FitConfig, nn.Module, FitResult]:
        """The layer, config, head and result of the best cell on ``metric`` (lowest NLL by default)."""
        sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
        layer, (config, head, result) = min(
            ((layer, cell) for layer, cells in self.cells.items() for cell in cells),
            key=lambda found: sign * found[1][2].final[metric],
        )
        return layer, config, head, result


HeadFactory = Callable[[str, int], nn.Module]
"""``(layer, seed) -> head``: a fresh head for a cell of that layer and seed (its init from the seed)."""


def _check_layers(train: Mapping[str, Any], val: Mapping[str, Any]) -> list[str]:
    if not isinstance(train, Mapping) or not isinstance(val, Mapping) or not train:
        raise UsageError(
            "train_features and val_features must be dicts {layer: features} (one cached feature tensor per "
            f"layer), got {type(train).__name__} and {type(val).__name__}; e.g. {{'layer4': cache.features}}."
        )
    if list(train) != list(val):
        raise UsageError(f"train_features has layers {list(train)} but val_features {list(val)}; give the same layers.")
    return list(train)


def _head_factory(head: str | HeadFactory, val: Mapping[str, torch.Tensor], num_classes: int) -> HeadFactory:
    """``head`` itself, or for ``"linear"`` / ``"mlp"`` the :func:`hookmix.build_head` of that kind on each
    layer's feature shape."""
    if callable(head):
        return head
    if head not in ("linear", "mlp"):
        raise UsageError(
            f"head={head!r} is neither 'linear', 'mlp' nor a function (layer, seed) -> nn.Module; give one of them "
            "(e.g. lambda layer, seed: build_head('model', ...) for the model's own head)."
        )
    return lambda layer, seed: build_head(head, feature_shape=val[layer].shape[1:], num_classes=num_classes, seed=seed)


def sweep(
    train_features: Mapping[str, torch.Tensor | ShardedFeatures],
    train_labels: torch.Tensor,
    val_features: Mapping[str, torch.Tensor],
    val_labels: torch.Tensor,
    *,
    num_classes: int,
    head: str | HeadFactory = "linear",
    alphas: Sequence[float] = (0.0, 0.2, 0.4, 1.0),
    cutmix_alphas: Sequence[float] = (0.0,),
    lrs: Sequence[float] = (3e-3,),
    seeds: int | Sequence[int] = 5,
    base: FitConfig = FitConfig(),
    head_name: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> SweepResult:
    """Does mixup help on these features? Train a grid of heads per layer and compare each mixing against
    none on the same seeds.

    Args:
        train_features / val_features: ``{layer: features}``: each layer's cached training features (N, ...)
            or (V, N, ...) (a :class:`hookmix.ShardedFeatures` streams them) and validation features (M, ...).
        train_labels / val_labels: (N,) / (M,) class indices, or (N, C) / (M, C) multi-hot rows (multi-label).
        num_classes: the number of classes.
        head: ``"linear"`` or ``"mlp"`` (:func:`hookmix.build_head` on each layer's feature shape), or a function
            ``(layer, seed) -> nn.Module`` giving a fresh head.
        alphas / cutmix_alphas: the mixup and CutMix α of the grid; 0 is always in both, and (0, 0) — no
            mixing — is the baseline every cell is compared with. CutMix needs features with positions
            (maps or tokens); on vectors a CutMix step interpolates, as :func:`hookmix.fit` does.
        lrs: AdamW learning rates. seeds: K (seeds 0..K-1) or the seeds themselves.
        base: the settings every cell shares (epochs, batch size, weight decay, the other mixing settings).
        head_name: the head's name in the records (default: ``head`` when it is a string, else ``"head"``).
        device / progress: as for :func:`hookmix.fit`. say: called with one line per layer (how it trains).

    Every cell is the run ``fit(head(layer, seed), "input", ...)`` would make with its config; the cells of
    one layer are trained together (:func:`fit_grid`).
    """
    layers = _check_layers(train_features, val_features)
    make = _head_factory(head, val_features, num_classes)
    name = head_name or (head if isinstance(head, str) else "head")
    seed_list = range(check_int("seeds", seeds, 1)) if isinstance(seeds, int) else seeds
    configs = grid_configs(base, alphas, lrs, list(seed_list), cutmix_alphas)
    result = SweepResult(records=[], summary={})
    for layer in layers:
        heads = [make(layer, c.seed) for c in configs]
        if say is not None:
            alone = grid_unstacked(heads, configs, train_features[layer], train_labels)
            how = f"one by one with fit ({alone})" if alone else "together"
            say(f"{layer}: training {len(configs)} {name} heads {how}")
        found = fit_grid(
            heads,
            configs,
            train_features[layer],
            train_labels,
            val_features[layer],
            val_labels,
            num_classes=num_classes,
            device=device,
            progress=progress,
        )
        result.cells[layer] = list(zip(configs, heads, found))
        result.records += [cell_record(layer, name, c, r, val_labels) for c, r in zip(configs, found)]
    result.summary = summary(result.records)
    return result
