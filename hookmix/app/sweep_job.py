"""The ``hookmix sweep`` job: per layer, one feature cache and a grid of heads (α × lr × seed) trained together.

It reuses the ``finetune`` job's phases — preparing the model and data, cutting and assembling the head,
the cache keys and cache directories (so the caches in ``--cache`` are shared with ``finetune``) — extracts every
layer's cache in one backbone pass per part (:meth:`~hookmix.FeatureCache.extract_many` with hooks on all the
layers), and trains each layer's cells with :func:`hookmix.headonly.sweep.fit_grid`. The data are prepared once,
with seed 0 (the split of a folder without ``--val``, the digits task, a random-init backbone); ``--seeds K``
varies each head's seed (its init, data order, mix plans, dropout). So a cell of seed s is exactly ``finetune
--seed s --data-seed 0`` with its α, lr, layer and head.

Writes ``sweep.json`` (settings, one record per cell, the paired differences against α = 0, the verdicts and
warnings), ``sweep.csv`` (the records), ``sweep.png`` (each metric against α per layer, mean ± 95% CI over
seeds) and the best cell on validation NLL as a normal run directory ``best/`` (``predict`` and ``export``
read it).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from hookmix.app.finetune_job import (
    JobSpec,
    _assemble,
    _cache_key,
    _cache_path,
    _CachePoint,
    _check_budget,
    _identity,
    _prepare,
    _Prepared,
    _report,
    _say_stored,
    _Trained,
)
from hookmix.core.devices import resolve_device
from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write
from hookmix.evaluation.metrics import mean_ci
from hookmix.graph.cutpoints import stage_names
from hookmix.headonly.cache import CacheKey, FeatureCache
from hookmix.headonly.sweep import (
    HIGHER_IS_BETTER,
    cell_alpha,
    cell_record,
    fit_grid,
    grid_configs,
    grid_unstacked,
    summary,
)
from hookmix.headonly.taps import LayerTaps
from hookmix.headonly.training import FitConfig

__all__ = ["SweepSpec", "format_table", "run_sweep"]

DATA_SEED = 0
"""The seed the sweep's data are prepared with (a folder's split, the digits task, a random-init backbone)."""


@dataclass(frozen=True)
class SweepSpec:
    """What ``hookmix sweep`` was asked to do: the finetune inputs (``job``; its ``layer`` is unused), the
    layers (``None``: the model's last two stages), the α and lr lists, the number of seeds and the base
    training settings (epochs, batch size) every cell shares."""

    job: JobSpec
    layers: tuple[str, ...] | None
    alphas: tuple[float, ...]
    lrs: tuple[float, ...]
    seeds: int
    base: FitConfig
    overwrite: bool = False


def _layers(spec: SweepSpec, prepared: _Prepared) -> tuple[str, ...]:
    """The requested layers, or the last two stages of the model (the digits CNN's last two)."""
    if spec.layers:
        return tuple(dict.fromkeys(spec.layers))
    try:
        return tuple(stage_names(prepared.model)[-2:])
    except UsageError as err:
        raise UsageError(f"the model has no stages to sweep by default ({err}); give --layers L1 [L2 ...].") from None


@dataclass
class _Layer:
    """One layer's trained grid: what its best cell needs to be written as a run, and the records."""

    prepared: _Prepared
    point: Any
    keys: tuple[Any, Any]
    trained: list[tuple[FitConfig, torch.nn.Module, Any]]
    caches: tuple[Any, Any]
    facts: dict[str, Any]


@dataclass(frozen=True)
class _Cut:
    """One layer of the sweep before training: the job prepared at the layer, the grid's configs, each seed's
    ``(backbone, head, cached point)`` as ``finetune`` assembles them, and the point's train / val cache keys."""

    prepared: _Prepared
    configs: list[FitConfig]
    by_seed: dict[int, tuple[torch.nn.Module, torch.nn.Module, _CachePoint]]
    keys: tuple[CacheKey, CacheKey]

    @property
    def point(self) -> _CachePoint:
        return self.by_seed[0][2]

    @property
    def fixed_ops(self) -> torch.nn.Module | None:
        """The fixed ops (average pool, flatten) that take the layer's map to the cached point, or ``None``:
        the map is cached (``finetune``'s backbone is then ``Sequential(cut model, fixed ops)``)."""
        return self.by_seed[0][0][1] if self.point.fixed_ops else None


def _cut(spec: SweepSpec, prepared: _Prepared, layer: str) -> _Cut:
    """Cut the model at ``layer`` for every seed of the grid, as ``finetune --layer`` would."""
    prepared = replace(prepared, layer=layer, layer_is_default=False)
    configs = grid_configs(spec.base, spec.alphas, spec.lrs, range(spec.seeds))
    by_seed = {c.seed: _assemble(prepared, spec.job, c) for c in configs}
    point = by_seed[0][2]
    keys = (_cache_key(prepared, "train", point.key_layer), _cache_key(prepared, "val", point.key_layer))
    return _Cut(prepared, configs, by_seed, keys)


@dataclass(frozen=True)
class _Extracted:
    """Every cut's ``(train, val)`` caches by cached point (:attr:`_CachePoint.key_layer`), and the facts of
    the extraction that each layer's run reports (device, memory budget, seconds of the shared passes)."""

    caches: dict[str, tuple[FeatureCache, FeatureCache]]
    facts: dict[str, Any]


def _extract_layers(
    spec: SweepSpec, cuts: Sequence[_Cut], device: torch.device, say: Callable[[str], None]
) -> _Extracted:
    """All layers' caches from ONE backbone pass over the training data and one over the validation data:
    hooks on every layer (:class:`~hookmix.headonly.taps.LayerTaps`), the forward stopped after the deepest.
    Each cache is the one ``finetune --layer`` makes (same point, key, ``--cache`` directory and bytes), so
    either reuses the other's; layers already cached are loaded, and when all are no backbone runs."""
    job = spec.job
    budget = max(_check_budget(job, cut.prepared, cut.point) for cut in cuts)
    taps = {cut.point.key_layer: (cut.point.layer, cut.fixed_ops) for cut in cuts}
    model = cuts[0].prepared.model

    def backbone_for(names: tuple[str, ...]) -> LayerTaps:
        return LayerTaps(model, {name: taps[name] for name in names})

    start, parts = time.perf_counter(), []
    for index, (part, dataset) in enumerate((("train", cuts[0].prepared.train), ("val", cuts[0].prepared.val))):
        train = index == 0
        parts.append(
            FeatureCache.extract_many(
                backbone_for,
                dataset,
                {
                    cut.point.key_layer: (cut.keys[index], _cache_path(job, cut.keys[index], cut.prepared.layer))
                    for cut in cuts
                },
                dtype=job.dtype,
                batch_size=job.batch_size,
                views=job.views if train else 1,
                num_workers=job.workers,
                device=device,
                progress=job.progress,
                mmap=None if train and job.cache_dir is not None else False,
                memory_budget=budget if train else None,
                desc=f"extracting {part} features",
            )
        )
    facts = {"device": str(device), "memory_budget": budget, "extract_seconds": round(time.perf_counter() - start, 3)}
    caches = {name: (parts[0][name], parts[1][name]) for name in taps}
    for cut in cuts:
        layer = cut.prepared.layer
        _say_stored(job, caches[cut.point.key_layer], budget, lambda line, layer=layer: say(f"{layer}: {line}"))
    return _Extracted(caches, facts)


def _sweep_layer(
    spec: SweepSpec, cut: _Cut, extracted: _Extracted, device: torch.device, say: Callable[[str], None]
) -> _Layer:
    """Train ``cut``'s grid of cells together on its layer's caches."""
    configs, layer = cut.configs, cut.prepared.layer
    heads = [copy.deepcopy(cut.by_seed[c.seed][1]) for c in configs]
    train, val = extracted.caches[cut.point.key_layer]
    alone = grid_unstacked(heads, configs, train.features, train.labels)
    how = f"one by one with fit ({alone})" if alone else "together"
    say(f"{layer}: training {len(configs)} {spec.job.head} heads {how} ({_grid_text(spec)})")
    results = fit_grid(
        heads,
        configs,
        train.features,
        train.labels,
        val.features[0],
        val.labels,
        num_classes=len(cut.prepared.classes),
        device=device,
        progress=spec.job.progress,
    )
    trained = list(zip(configs, heads, results))
    return _Layer(cut.prepared, cut.point, cut.keys, trained, (train, val), dict(extracted.facts))


def _grid_text(spec: SweepSpec) -> str:
    alphas = " ".join(f"{a:g}" for a in sorted({0.0, *spec.alphas}))
    return f"α {alphas} × lr {' '.join(f'{v:g}' for v in spec.lrs)} × {spec.seeds} seeds"


def _write_best(spec: SweepSpec, layers: Sequence[_Layer]) -> dict[str, Any]:
    """Write the cell of the lowest validation NLL as a normal run directory ``--out/best``; its record."""
    done, (config, head, result) = min(
        ((layer, cell) for layer in layers for cell in layer.trained), key=lambda found: found[1][2].final["val_nll"]
    )
    job = replace(spec.job, out_dir=spec.job.out_dir / "best", layer=done.prepared.layer)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("run.json", "head.safetensors"):  # a best run of an earlier sweep, replaced with --overwrite
        (job.out_dir / name).unlink(missing_ok=True)
    identity = _identity(job, done.prepared, done.point, config, [key.fingerprint() for key in done.keys])
    train, val = done.caches
    _report(job, config, done.prepared, done.point, _Trained(train, val, head, result, done.facts, identity))
    return {"layer": done.prepared.layer, "alpha": cell_alpha(config), "lr": config.lr, "seed": config.seed}


def _check_out(spec: SweepSpec) -> None:
    out = spec.job.out_dir
    if (out / "sweep.json").exists() and not spec.overwrite:
        raise UsageError(f"--out {out} holds a finished sweep (sweep.json); give another --out, or --overwrite.")


def run_sweep(spec: SweepSpec, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep and write its report; returns the ``sweep.json`` payload."""
    _check_out(spec)
    device = resolve_device(spec.job.device)
    prepared = _prepare(spec.job, DATA_SEED)
    if prepared.task != "multiclass":
        raise UsageError("sweep compares multi-class runs (accuracy, NLL, ECE); multi-label sweeps are not built yet.")
    layers = _layers(spec, prepared)
    say(f"{prepared.source.id} @ {', '.join(layers)} on {device}: {_grid_text(spec)}")
    cuts = [_cut(spec, prepared, layer) for layer in layers]
    extracted = _extract_layers(spec, cuts, device, say)
    done = [_sweep_layer(spec, cut, extracted, device, say) for cut in cuts]
    records = [
        cell_record(layer.prepared.layer, spec.job.head, config, result, layer.caches[1].labels)
        for layer in done
        for config, _, result in layer.trained
    ]
    payload = {
        "model": prepared.source.id,
        "head": spec.job.head,
        "layers": list(layers),
        "data_seed": DATA_SEED,
        "settings": {"epochs": spec.base.epochs, "batch_size": spec.base.batch_size, "seeds": spec.seeds},
        "records": records,
        **summary(records),
        "best": _write_best(spec, done),
    }
    out = spec.job.out_dir
    atomic_write(out / "sweep.json", json.dumps(payload, indent=1).encode())
    atomic_write(out / "sweep.csv", _csv(records))
    plot_sweep(records, out / "sweep.png")
    return payload


def _csv(records: Sequence[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue().encode()


def _arms(records: Sequence[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """The records by (layer, head, lr, α), in the order they come."""
    arms: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        arms.setdefault((r["layer"], r["head"], r["lr"], r["alpha"]), []).append(r)
    return arms


def _metrics(records: Sequence[dict[str, Any]]) -> list[str]:
    return [m for m in HIGHER_IS_BETTER if m in records[0]]


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """One line per layer, head, lr and α: each metric's mean ± 95% CI half-width over seeds."""
    metrics = _metrics(records)
    lines = [f"{'layer':<12} {'head':<7} {'lr':>8} {'alpha':>6} {'seeds':>5} " + " ".join(f"{m:>19}" for m in metrics)]
    for (layer, head, lr, alpha), members in _arms(records).items():
        cells = []
        for metric in metrics:
            mean, half = mean_ci([m[metric] for m in members])
            cells.append(f"{mean:>10.4f} ± {half:<6.4f}" if not math.isnan(half) else f"{mean:>10.4f}         ")
        lines.append(f"{layer:<12} {head:<7} {lr:>8g} {alpha:>6g} {len(members):>5} " + " ".join(cells))
    return "\n".join(lines)


def plot_sweep(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Each metric against α, one line per layer (and lr), mean ± 95% CI over seeds; a PNG at ``path``."""
    from hookmix.evaluation.plots import _new_figure, _save

    metrics = _metrics(records)
    figure = _new_figure(4.0 * len(metrics), 3.2)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    lines: dict[tuple[Any, ...], dict[float, list[dict[str, Any]]]] = {}
    for (layer, head, lr, alpha), members in _arms(records).items():
        lines.setdefault((layer, head, lr), {})[alpha] = members
    for ax, metric in zip(axes, metrics):
        for (layer, head, lr), by_alpha in lines.items():
            alphas = sorted(by_alpha)
            stats = [mean_ci([m[metric] for m in by_alpha[a]]) for a in alphas]
            errors = [0.0 if math.isnan(half) else half for _, half in stats]
            label = f"{layer} ({head}, lr {lr:g})"
            ax.errorbar(alphas, [mean for mean, _ in stats], yerr=errors, marker="o", capsize=3, label=label)
        ax.set_xlabel("α (0: no mixup)")
        ax.set_title(f"validation {metric.removeprefix('val_')}")
    axes[0].legend(fontsize=7)
    return _save(figure, path)
