"""PNG figures for experiments: learning curves, reliability diagrams and the drawn mixup λ values.

matplotlib is optional (``pip install hookmix[plots]``) and imported only when a plot is drawn.
Figures are built as ``matplotlib.figure.Figure`` objects rendered by the Agg canvas, never through
``pyplot``: no GUI backend is selected, the caller's backend is left alone and no figure stays
registered (nothing leaks in long sweeps). Every file is written atomically.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch

from hookmix.core.checks import is_number
from hookmix.core.errors import UsageError
from hookmix.core.files import atomic_write
from hookmix.evaluation.metrics import ReliabilityCurve
from hookmix.mixing.settings import MixSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "lambda_density_alpha",
    "plot_history",
    "plot_reliability",
    "plot_lambda_hist",
    "new_figure",
    "save_figure",
]

History = Sequence[Mapping[str, float]]
HISTORY_PANELS = (
    ("train_loss", "train loss"),
    ("val_nll", "validation NLL"),
    ("val_accuracy", "validation accuracy"),
    ("val_ece", "validation ECE"),
)
MULTILABEL_PANEL = ("val_map", "validation mAP (macro)")
"""The third panel of a multi-label history (records with ``val_map`` instead of ``val_accuracy``)."""


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure of ``width`` x ``height`` inches on the Agg canvas (no display, no global pyplot
    state), laid out "constrained"; write it with :func:`save_figure`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("hookmix plots need matplotlib: pip install hookmix[plots]") from error
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png_path(path: str | os.PathLike[str]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}.")
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise UsageError(f"path={str(path)!r} must end in .png (the plots are written as PNG).")
    return target


def save_figure(figure: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``figure`` as a PNG to ``path`` atomically (temporary file in the same folder + rename)."""
    target = _png_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write(target, buffer.getvalue())
    return target


def _panels(record: object) -> tuple[tuple[str, str], ...]:
    """The four panels of a history: accuracy in the third, or a multi-label run's mAP."""
    if isinstance(record, Mapping) and "val_map" in record and "val_accuracy" not in record:
        return (*HISTORY_PANELS[:2], MULTILABEL_PANEL, HISTORY_PANELS[3])
    return HISTORY_PANELS


def _runs(history: History | Mapping[str, History]) -> dict[str, History]:
    """Normalise one history or ``{label: history}`` into labelled runs, validating every record."""
    runs = dict(history) if isinstance(history, Mapping) else {"": history}
    if not runs:
        raise UsageError("history={} holds no runs; pass a list of per-epoch dicts or {label: list}.")
    for label, records in runs.items():
        if isinstance(records, (str, bytes)) or not isinstance(records, Sequence) or not records:
            raise UsageError(
                f"history{f'[{label!r}]' if label else ''} must be a non-empty list of per-epoch dicts, "
                f"got {records!r}."
            )
        for record in records:
            required = ("epoch", *(key for key, _ in _panels(record)))
            missing = [key for key in required if not isinstance(record, Mapping) or key not in record]
            if missing:
                raise UsageError(
                    f"history{f'[{label!r}]' if label else ''} has a record {record!r} without "
                    f"{', '.join(missing)}; every epoch needs {', '.join(required)}."
                )
    return runs


def plot_history(history: History | Mapping[str, History], path: str | os.PathLike[str]) -> Path:
    """Learning curves per epoch: train loss, validation NLL, accuracy (multi-label: mAP) and ECE, one panel each.

    ``history`` is a list of per-epoch dicts with keys ``epoch``, ``train_loss``, ``val_nll``,
    ``val_accuracy`` (or ``val_map``) and ``val_ece`` (extra keys are ignored), or ``{label: history}`` to overlay
    several runs. Writes a PNG to ``path`` and returns it.
    """
    runs = _runs(history)
    figure = new_figure(9.0, 6.5)
    axes = figure.subplots(2, 2, sharex=True).ravel()
    for ax, (key, title) in zip(axes, _panels(next(iter(runs.values()))[0])):
        for label, records in runs.items():
            epochs = [record["epoch"] for record in records]
            ax.plot(epochs, [record[key] for record in records], marker="o", markersize=3, label=label or None)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("epoch")
    if any(runs):
        axes[0].legend(fontsize="small")
    return save_figure(figure, path)


def plot_reliability(curves: Mapping[str, ReliabilityCurve], path: str | os.PathLike[str]) -> Path:
    """ReliabilityCurve diagram: per-bin accuracy against mean confidence for each model, plus the diagonal.

    ``curves`` maps a model label to its :func:`hookmix.reliability`; empty bins are skipped
    and each legend entry shows the model's ECE. Writes a PNG to ``path`` and returns it.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise UsageError(
            f"curves must be a non-empty dict {{label: ReliabilityCurve}}, got {curves!r}; "
            "build each value with hookmix.reliability(logits, y)."
        )
    for label, curve in curves.items():
        if not isinstance(curve, ReliabilityCurve):
            raise TypeError(
                f"curves[{label!r}] must be a ReliabilityCurve, got {type(curve).__name__}; "
                "build it with hookmix.reliability(logits, y)."
            )
    figure = new_figure(5.5, 5.0)
    ax = figure.subplots()
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", label="perfect calibration")
    for label, curve in curves.items():
        filled = curve.count > 0
        ax.plot(
            curve.confidence[filled].numpy(),
            curve.accuracy[filled].numpy(),
            marker="o",
            label=f"{label} (ECE {curve.ece:.3f})",
        )
    ax.set(xlim=(0.0, 1.0), ylim=(0.0, 1.0), xlabel="confidence", ylabel="accuracy", title="reliability")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    return save_figure(figure, path)


def _beta_density(x: np.ndarray, alpha: float) -> np.ndarray:
    """Density of Beta(α, α) at ``x`` in ``(0, 1)``."""
    log_norm = math.lgamma(2.0 * alpha) - 2.0 * math.lgamma(alpha)
    return np.exp(log_norm + (alpha - 1.0) * (np.log(x) + np.log1p(-x)))


def lambda_density_alpha(settings: MixSettings) -> float | None:
    """The α of the Beta(α, α) density that the λ recorded in training under ``settings`` follow, for
    :func:`plot_lambda_hist`; ``None`` when they follow no Beta(α, α): a CutMix step records the share each
    row really kept (its box is clipped at the map's edge and rounded to whole positions), and ``dominant``
    folds λ onto [0.5, 1]. So only mixup alone draws a curve (``alpha`` is 0 in a CutMix-only run)."""
    mixup_only = settings.alpha > 0 and not settings.uses_cutmix
    return settings.alpha if mixup_only and not settings.dominant else None


def plot_lambda_hist(lams: torch.Tensor | np.ndarray, path: str | os.PathLike[str], alpha: float | None = None) -> Path:
    """Histogram (as a density) of drawn mixing coefficients λ, optionally with the Beta(α, α) density.

    ``lams`` holds values in ``[0, 1]`` of any shape (e.g. ``(B,)`` per batch, concatenated over steps).
    Writes a PNG to ``path`` and returns it.
    """
    if not isinstance(lams, (torch.Tensor, np.ndarray)):
        raise TypeError(f"lams must be a torch.Tensor or numpy array, got {type(lams).__name__}.")
    values = np.asarray(lams.detach().cpu() if isinstance(lams, torch.Tensor) else lams, dtype=float).ravel()
    if values.size == 0:
        raise UsageError("lams is empty; pass the λ values drawn during training (at least one).")
    if not np.all((values >= 0.0) & (values <= 1.0)):
        raise UsageError(
            f"lams must hold mixing coefficients in [0, 1], got values in [{values.min()}, {values.max()}]."
        )
    bad_alpha = not is_number(alpha) or not 0 < alpha < math.inf
    if alpha is not None and bad_alpha:
        raise UsageError(f"alpha must be a positive finite number (of Beta(α, α)) or None, got {alpha!r}.")
    figure = new_figure(6.0, 4.0)
    ax = figure.subplots()
    bins = np.linspace(0.0, 1.0, 31)
    heights, _, _ = ax.hist(values, bins=bins, density=True, alpha=0.6, label=f"{values.size} draws")
    if alpha is not None:
        grid = np.linspace(1e-3, 1.0 - 1e-3, 400)
        ax.plot(grid, _beta_density(grid, alpha), color="black", label=f"Beta({alpha:g}, {alpha:g})")
        # Beta(α < 1) is unbounded at 0 and 1: keep the histogram readable instead of the density's spikes
        ax.set_ylim(0.0, 1.2 * max(float(np.max(heights)), float(_beta_density(np.array([0.5]), alpha)[0])))
    ax.set(xlim=(0.0, 1.0), xlabel="λ", ylabel="density", title="mixing coefficients")
    ax.legend(fontsize="small")
    return save_figure(figure, path)
