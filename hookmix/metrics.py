"""Classifier evaluation: accuracy, NLL, calibration (ECE, reliability diagram) and seed-level CIs.

Mixup mostly changes *calibration*, not only accuracy, so every run reports the mean cross-entropy
(NLL) and the expected calibration error (ECE) next to top-1 accuracy. All functions take logits
``(B, C)`` and integer labels ``(B,)`` and return plain Python numbers, so results serialise to JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from hookmix._checks import check_class_indices, is_int, is_number
from hookmix._errors import UsageError

__all__ = ["Reliability", "accuracy", "nll", "ece", "reliability", "mean_ci", "evaluate"]


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
class Reliability:
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


def reliability(logits: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> Reliability:
    """Bin the top-1 confidence of ``logits`` ``(B, C)`` into ``n_bins`` equal-width bins on ``[0, 1]``.

    The confidence is the top softmax probability of the logits, the same convention as :func:`nll`:
    every input is treated as logits, even rows that happen to look like probabilities (pass
    ``probs.log()`` to bin probabilities).
    """
    y = _check_logits_labels(logits, y)
    if not is_int(n_bins, 1):
        raise UsageError(f"n_bins must be a positive int, got {n_bins!r}; 15 is the usual choice.")
    confidence, predicted = logits.detach().double().softmax(dim=1).max(dim=1)
    correct = (predicted == y).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=confidence.device)
    bins = torch.bucketize(confidence, edges[1:-1])
    count = torch.bincount(bins, minlength=n_bins)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device).index_add_(0, bins, confidence)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device).index_add_(0, bins, correct)
    denominator = count.double()
    return Reliability(
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
