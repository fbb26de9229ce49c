"""Classifier evaluation: accuracy, NLL, calibration (ECE, reliability diagram) and seed-level CIs.

Mixup mostly changes *calibration*, not only accuracy, so every run reports the mean cross-entropy
(NLL) and the expected calibration error (ECE) next to top-1 accuracy. All functions take logits
``(B, C)`` and integer labels ``(B,)`` and return plain Python numbers, so results serialise to JSON.

Multi-label heads (one sigmoid per label, ``BCEWithLogitsLoss``) are evaluated by
:func:`evaluate_multilabel` (macro mAP, macro-F1 at per-label thresholds from :func:`tune_thresholds`,
BCE, per-label ECE) on logits ``(N, L)`` and multi-hot targets ``(N, L)``: AP and ECE by torchmetrics, F1
from exact counts; :func:`reliability_multilabel` bins the same probabilities for a reliability diagram.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from hookmix.core.checks import check_class_indices, is_int, is_number
from hookmix.core.errors import UsageError

__all__ = [
    "ReliabilityCurve",
    "accuracy",
    "nll",
    "ece",
    "reliability",
    "mean_ci",
    "evaluate",
    "tune_thresholds",
    "apply_thresholds",
    "evaluate_multilabel",
    "reliability_multilabel",
]


def _check_logits_labels(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Validate ``logits`` ``(B, C)`` against labels ``y`` ``(B,)``; return ``y`` on the logits' device."""
    if not isinstance(logits, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(
            f"logits and y must be torch.Tensors, got {type(logits).__name__} and {type(y).__name__}; "
            "convert with torch.as_tensor(...)."
        )
    if logits.ndim != 2 or not logits.is_floating_point():
        raise UsageError(
            f"logits must be a floating-point (B, C) tensor, got shape {tuple(logits.shape)} and dtype "
            f"{logits.dtype}; flatten extra dimensions and cast with .float()."
        )
    if y.ndim != 1 or y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise UsageError(
            f"y must be an integer (B,) tensor of class indices, got shape {tuple(y.shape)} and dtype {y.dtype}; "
            "pass hard labels (e.g. soft_targets.argmax(1)), cast with .long()."
        )
    if logits.shape[0] != y.shape[0] or logits.shape[0] == 0:
        raise UsageError(
            f"logits has {logits.shape[0]} rows but y has {y.shape[0]} labels; pass one row per label, at least one."
        )
    check_class_indices(y, logits.shape[1], "y", "relabel y or check the number of classes (the logits' columns)")
    if torch.isnan(logits).any():
        raise UsageError("logits contains NaN; the model diverged or the input holds NaN.")
    return y.to(logits.device)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in ``[0, 1]`` of ``logits`` ``(B, C)`` against labels ``y`` ``(B,)``."""
    y = _check_logits_labels(logits, y)
    return (logits.argmax(dim=1) == y).double().mean().item()


def nll(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy (negative log-likelihood, nats) of ``logits`` ``(B, C)`` for labels ``y`` ``(B,)``.

    Takes logits, not probabilities: equals ``F.cross_entropy(logits, y)``, computed in float64.
    """
    y = _check_logits_labels(logits, y)
    return F.cross_entropy(logits.double(), y).item()


@dataclass(frozen=True, eq=False)
class ReliabilityCurve:
    """Per-bin calibration of a classifier's top-1 confidence (one reliability diagram).

    ``edges`` ``(n_bins + 1,)`` are the equal-width bin edges on ``[0, 1]``; bin ``i`` holds the examples
    whose confidence lies in ``(edges[i], edges[i + 1]]``. ``confidence`` and ``accuracy`` ``(n_bins,)`` are
    the mean top-1 confidence and accuracy in each bin (NaN for empty bins); ``count`` ``(n_bins,)`` is the
    number of examples per bin.
    """

    edges: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor
    count: torch.Tensor

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean of ``|accuracy - confidence|`` over bins."""
        filled = self.count > 0
        gaps = (self.accuracy[filled] - self.confidence[filled]).abs()
        weights = self.count[filled].double() / self.count.sum()
        return (weights * gaps).sum().item()


def reliability(logits: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> ReliabilityCurve:
    """Bin the top-1 confidence of ``logits`` ``(B, C)`` into ``n_bins`` equal-width bins on ``[0, 1]``.

    The confidence is the top softmax probability of the logits, the same convention as :func:`nll`:
    every input is treated as logits, even rows that happen to look like probabilities (pass
    ``probs.log()`` to bin probabilities).
    """
    y = _check_logits_labels(logits, y)
    confidence, predicted = logits.detach().double().softmax(dim=1).max(dim=1)
    return _binned(confidence, (predicted == y).double(), n_bins)


def _binned(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int) -> ReliabilityCurve:
    """A :class:`ReliabilityCurve` of float64 ``confidence`` ``(M,)`` in ``[0, 1]`` against float64 ``correct`` ``(M,)``
    (1 for a hit, 0 for a miss), in ``n_bins`` equal-width bins closed on the right."""
    if not is_int(n_bins, 1):
        raise UsageError(f"n_bins must be a positive int, got {n_bins!r}; 15 is the usual choice.")
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=confidence.device)
    bins = torch.bucketize(confidence, edges[1:-1])
    count = torch.bincount(bins, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device).index_add_(0, bins, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device).index_add_(0, bins, correct)
    denominator = count.double()
    return ReliabilityCurve(
        edges=edges.cpu(),
        confidence=(conf_sum / denominator).cpu(),
        accuracy=(acc_sum / denominator).cpu(),
        count=count.cpu(),
    )


def ece(logits: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error (top-1 softmax confidence, ``n_bins`` equal-width bins) of logits ``(B, C)``.

    ``ECE = sum_b |B_b| / B * |acc(B_b) - conf(B_b)|``; 0 for a perfectly calibrated classifier.
    """
    return reliability(logits, y, n_bins).ece


def evaluate(logits: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """``{"accuracy", "nll", "ece"}`` of ``logits`` ``(B, C)`` against labels ``y`` ``(B,)``."""
    return {"accuracy": accuracy(logits, y), "nll": nll(logits, y), "ece": ece(logits, y, n_bins)}


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function ``I_x(a, b)`` (continued fraction, Numerical Recipes 6.4)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def _t_quantile(level: float, df: int) -> float:
    """The ``t`` with ``P(|T| <= t) = level`` for Student's t with ``df`` degrees of freedom.

    Uses ``P(|T| > t) = I_x(df/2, 1/2)`` with ``x = df / (df + t^2)`` and bisects on ``log x``.
    """
    low, high = -2000.0, 0.0  # log x; I_x is increasing in x
    for _ in range(100):
        middle = 0.5 * (low + high)
        if _betainc(df / 2.0, 0.5, math.exp(middle)) < 1.0 - level:
            low = middle
        else:
            high = middle
    log_x = 0.5 * (low + high)
    return math.sqrt(df * -math.expm1(log_x) / math.exp(log_x))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean of ``values`` (e.g. one metric over seeds) and the half-width of its Student-t CI.

    The interval is ``mean ± t_{(1+level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard
    deviation; with a single value the half-width is NaN (no spread can be estimated).
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"values must be a sequence of numbers, got {type(values).__name__}; pass a list.")
    numbers = [float(v) for v in values]
    if not numbers or not all(math.isfinite(v) for v in numbers):
        raise UsageError(f"values must be a non-empty list of finite numbers, got {list(values)!r}.")
    if not is_number(level) or not 0.0 < level < 1.0:
        raise UsageError(f"level must be a confidence level in (0, 1), got {level!r}; e.g. level=0.95.")
    n = len(numbers)
    mean = math.fsum(numbers) / n
    if n == 1:
        return mean, math.nan
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in numbers) / (n - 1))
    return mean, _t_quantile(level, n - 1) * std / math.sqrt(n)


# Multi-label evaluation: every label is an independent binary prediction, p = sigmoid(logit).


def _torchmetrics() -> Any:
    """``torchmetrics.functional.classification``, imported on first use: importing it takes seconds."""
    import torchmetrics.functional.classification as classification

    return classification


def _check_multilabel(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``logits`` ``(N, L)`` against multi-hot ``targets`` ``(N, L)``; return the probabilities
    ``sigmoid(logits)`` and the targets as int64, both ``(N, L)``, in float64 / on the logits' device."""
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(
            f"logits and targets must be torch.Tensors, got {type(logits).__name__} and {type(targets).__name__}; "
            "convert with torch.as_tensor(...)."
        )
    if logits.ndim != 2 or not logits.is_floating_point() or logits.shape[0] == 0:
        raise UsageError(
            f"logits must be a floating-point (N, L) tensor with N >= 1 (one column per label), got shape "
            f"{tuple(logits.shape)} and dtype {logits.dtype}; cast with .float()."
        )
    if targets.shape != logits.shape:
        raise UsageError(
            f"targets have shape {tuple(targets.shape)} but logits {tuple(logits.shape)}; pass one multi-hot row "
            "(N, L) per row of logits."
        )
    if torch.isnan(logits).any():
        raise UsageError("logits contains NaN; the model diverged or the input holds NaN.")
    if targets.is_complex() or not ((targets == 0) | (targets == 1)).all():
        values = ", ".join(f"{v:g}" for v in sorted({float(v) for v in targets.flatten().tolist()} - {0.0, 1.0})[:3])
        raise UsageError(
            f"targets must be multi-hot (every entry 0 or 1), got entries such as {values}; evaluate on the hard "
            "labels of the validation data, not on mixed or smoothed targets."
        )
    return logits.detach().double().sigmoid(), targets.detach().to(logits.device, torch.int64)


def _check_thresholds(thresholds: torch.Tensor | Sequence[float] | None, n_labels: int) -> torch.Tensor:
    """``thresholds`` as a float64 ``(L,)`` tensor of probabilities in ``[0, 1]`` (0.5 each when ``None``)."""
    if thresholds is None:
        return torch.full((n_labels,), 0.5, dtype=torch.float64)
    if isinstance(thresholds, (str, bytes)) or not isinstance(thresholds, (torch.Tensor, Sequence)):
        raise TypeError(
            f"thresholds must be a (L,) tensor or list of probabilities, got {type(thresholds).__name__}; "
            "build them with hookmix.tune_thresholds(logits, targets)."
        )
    values = torch.as_tensor(thresholds, dtype=torch.float64).detach().cpu()
    if values.shape != (n_labels,) or not ((values >= 0) & (values <= 1)).all():
        raise UsageError(
            f"thresholds must be {n_labels} probabilities in [0, 1] (one per label), got {values.tolist()!r}; "
            "build them with hookmix.tune_thresholds(logits, targets)."
        )
    return values


def tune_thresholds(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-label decision thresholds ``(L,)`` (float64 probabilities) that maximise each label's F1 on this data.

    For label ``j`` the candidates are the distinct probabilities ``sigmoid(logits[:, j])`` observed (F1
    changes only there), each used as ``predict j when p >= t``. F1 at every candidate is ``2·TP / (predicted
    + positives)`` from the counts, in float64: equal fractions are then equal floats (torchmetrics' float32
    precision and recall can make two equal F1s differ by a rounding). The threshold with the highest F1
    wins, the smallest one among ties, so the result is deterministic. A label without any positive example
    has no F1 to maximise (it is 0 at every threshold) and gets 0.5.

    Tune on validation logits ``(N, L)`` and multi-hot targets ``(N, L)``, save the thresholds with the
    run and apply them with :func:`apply_thresholds`; F1 measured on the data they were tuned on is
    optimistic.
    """
    probs, targets = _check_multilabel(logits, targets)
    thresholds = torch.full((probs.shape[1],), 0.5, dtype=torch.float64)
    for label, (p, t) in enumerate(zip(probs.T.contiguous(), targets.T.contiguous())):
        if t.any():
            candidates = torch.unique(p)  # ascending: argmax's first maximum is the smallest tied threshold
            ascending, order = p.sort()
            predicted = p.numel() - torch.searchsorted(ascending, candidates)  # rows with p >= candidate
            true_positives = t[order].flip(0).cumsum(0)[predicted - 1]
            f1 = 2 * true_positives.double() / (predicted + t.sum()).double()
            thresholds[label] = candidates[int(f1.argmax())]
    return thresholds


def apply_thresholds(logits: torch.Tensor, thresholds: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Predicted label sets: ``sigmoid(logits) >= thresholds`` as a bool ``(N, L)`` tensor.

    ``logits`` ``(N, L)``; ``thresholds`` ``(L,)`` probabilities, e.g. from :func:`tune_thresholds`. The
    sigmoid is taken in float64, as when the thresholds were tuned.
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        raise UsageError(
            f"logits must be a floating-point (N, L) tensor, got {type(logits).__name__} "
            f"{tuple(getattr(logits, 'shape', ()))}; cast with .float()."
        )
    limits = _check_thresholds(thresholds, logits.shape[1]).to(logits.device)
    return logits.detach().double().sigmoid() >= limits


def _f1(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """F1 of bool predictions ``(N,)`` against bool truth ``(N,)`` with at least one positive: ``2·TP /
    (predicted + positives)`` from integer counts, one division of Python ints (correctly rounded to float64,
    so equal fractions are equal floats; float32 counts would round past 2**24 and the ratio to 7 digits)."""
    return 2 * int((predicted & truth).sum()) / (int(predicted.sum()) + int(truth.sum()))


def evaluate_multilabel(
    logits: torch.Tensor,
    targets: torch.Tensor,
    thresholds: torch.Tensor | Sequence[float] | None = None,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Multi-label validation metrics of ``logits`` ``(N, L)`` against multi-hot ``targets`` ``(N, L)``.

    Every label is an independent binary prediction with probability ``sigmoid(logit)``. AP and ECE come
    from torchmetrics (``torchmetrics.functional.classification``), fed probabilities in float64:

    * ``map``: macro average precision, the mean of each label's ``binary_average_precision`` over the
      labels with at least one positive example (equal to ``multilabel_average_precision(average="macro")``
      when every label has positives);
    * ``f1``: macro F1 at the per-label ``thresholds`` (0.5 each when ``None``): each label is binarised
      with its own, ``p >= thresholds[j]``, and its F1 is ``2·TP / (predicted + positives)`` from exact
      integer counts, divided once in float64 (torchmetrics' ``binary_f1_score`` divides in float32);
      averaged over the same labels as ``map``;
    * ``nll``: the mean binary cross-entropy over all ``N * L`` entries (``BCEWithLogitsLoss``), in nats;
    * ``ece``: the mean over all labels of each label's expected calibration error
      (``binary_calibration_error``, L1, ``n_bins`` equal-width bins: predicted probability against the
      frequency of positives); :func:`reliability_multilabel` gives the bins to plot.

    AP and F1 of a label without positives are undefined (torchmetrics would count them as 0, which drags
    the macro mean down for reasons unrelated to the model), so those labels are left out of ``map`` and
    ``f1``, listed as NaN per label, and ``labels_with_positives`` says how many labels were averaged;
    with none at all ``map`` and ``f1`` are NaN.

    Returns ``{"map", "f1", "nll", "ece": float, "labels_with_positives": int, "per_label_ap",
    "per_label_f1", "per_label_ece", "thresholds": list[float] (L)}``, ready for JSON.
    """
    probs, hits = _check_multilabel(logits, targets)
    limits = _check_thresholds(thresholds, probs.shape[1]).to(probs.device)
    if not is_int(n_bins, 1):
        raise UsageError(f"n_bins must be a positive int, got {n_bins!r}; 15 is the usual choice.")
    tm = _torchmetrics()
    ap, f1, per_label_ece = [], [], []
    for p, t, limit in zip(probs.T.contiguous(), hits.T.contiguous(), limits):
        present = bool(t.any())
        ap.append(tm.binary_average_precision(p, t).item() if present else math.nan)
        f1.append(_f1(p >= limit, t == 1) if present else math.nan)
        per_label_ece.append(tm.binary_calibration_error(p, t, n_bins=n_bins, norm="l1").item())
    averaged = [(a, f) for a, f in zip(ap, f1) if not math.isnan(a)]
    bce = F.binary_cross_entropy_with_logits(logits.detach().double(), hits.double())
    return {
        "map": math.fsum(a for a, _ in averaged) / len(averaged) if averaged else math.nan,
        "f1": math.fsum(f for _, f in averaged) / len(averaged) if averaged else math.nan,
        "nll": bce.item(),
        "ece": math.fsum(per_label_ece) / len(per_label_ece),
        "labels_with_positives": len(averaged),
        "per_label_ap": ap,
        "per_label_f1": f1,
        "per_label_ece": per_label_ece,
        "thresholds": limits.cpu().tolist(),
    }


def reliability_multilabel(
    logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15, label: int | None = None
) -> ReliabilityCurve:
    """ReliabilityCurve of multi-label probabilities ``sigmoid(logits)`` ``(N, L)``, for a reliability diagram.

    Each (example, label) entry is one binary prediction: its ``confidence`` is the predicted probability
    and its "accuracy" is whether the label is present (``targets`` ``(N, L)`` multi-hot), so a bin's
    ``accuracy`` is the frequency of positives among the entries predicted with that probability. Bins as
    :func:`reliability` (closed on the right). ``label=None`` pools all ``N * L`` entries; ``label=j``
    takes column ``j`` only, whose ``.ece`` equals ``evaluate_multilabel(...)["per_label_ece"][j]``
    except for probabilities exactly on a bin edge (torchmetrics closes bins on the left). Draw it with
    :func:`hookmix.evaluation.plots.plot_reliability` (``{"label": curve}``).
    """
    probs, hits = _check_multilabel(logits, targets)
    if label is not None:
        if not is_int(label, 0) or label >= probs.shape[1]:
            raise UsageError(
                f"label={label!r} must be a column index in [0, {probs.shape[1] - 1}], or None to pool all labels."
            )
        probs, hits = probs[:, label].contiguous(), hits[:, label]
    return _binned(probs.flatten(), hits.flatten().double(), n_bins)
