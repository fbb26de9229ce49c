"""Temperature scaling (hookmix.evaluation.calibration): the fitted T minimises the NLL, never worsens it, and
recovers a known temperature.

Bugs a maintainer could plausibly make here, and the test that catches each:

* T applied the wrong way (``logits * T``), or the optimiser stopped early:
  ``test_a_known_temperature_is_recovered_and_is_a_minimum``;
* the "keep T = 1 when the optimiser ends worse" guard dropped, its comparison reversed, or its
  non-finite check dropped (a NaN / inf T returned):
  ``test_an_optimiser_that_ends_worse_than_t_equals_1_gives_exactly_1`` (a stand-in L-BFGS forces each
  bad end); a guard that always returns 1:
  ``test_an_optimiser_that_ends_better_than_t_equals_1_is_kept``;
* multi-label targets scored with softmax instead of one T shared by the sigmoids:
  ``test_multilabel_uses_one_temperature_for_every_sigmoid``;
* bad inputs accepted: ``test_bad_inputs_are_refused``.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from hookmix.evaluation.calibration import fit_temperature, temperature_nll
from hookmix.evaluation.metrics import ece


def _calibrated(n: int = 4000, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is the true class distribution: labels are drawn from it."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, classes, generator=gen)
    labels = torch.multinomial(F.softmax(logits, 1), 1, generator=gen).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.05, 0.5, 2.0, 20.0])  # 0.05: needs the line search
def test_a_known_temperature_is_recovered_and_is_a_minimum(true_t: float) -> None:
    """Logits calibrated at T=1, then scaled by 1/true_t: the fit finds true_t, and the NLL at T is below
    the NLL at every point of a grid around it (checked by hand with F.cross_entropy)."""
    logits, labels = _calibrated()
    scaled = logits * true_t
    t = fit_temperature(scaled, labels)
    assert t == pytest.approx(true_t, rel=0.1)
    at_t = F.cross_entropy(scaled.double() / t, labels).item()
    for other in torch.linspace(0.5 * t, 2 * t, 31).tolist():
        assert at_t <= F.cross_entropy(scaled.double() / other, labels).item() + 1e-9
    assert ece(scaled / t, labels) < ece(scaled, labels)


def test_under_confident_logits_get_sharpened() -> None:
    logits, labels = _calibrated()
    assert fit_temperature(logits / 3, labels) < 0.5


@pytest.mark.parametrize("seed", range(5))
def test_fitting_never_worsens_the_nll(seed: int) -> None:
    """T = 1 is a candidate: on few, noisy examples the fitted T is no worse than T = 1."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, 3, generator=gen)
    labels = torch.randint(0, 3, (7,), generator=gen)
    t = fit_temperature(logits, labels, max_iter=2)
    assert F.cross_entropy(logits.double() / t, labels) <= F.cross_entropy(logits.double(), labels) + 1e-12


class _EndsAt(torch.optim.LBFGS):
    """An L-BFGS whose ``step`` ends at ``log T = END`` whatever the loss says (a diverged optimiser)."""

    END = 0.0

    def step(self, closure):  # type: ignore[override]
        loss = closure()
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(self.END)
        return loss


@pytest.mark.parametrize(
    "end", [math.log(50.0), -math.log(50.0), math.inf, math.nan], ids=["T=50", "T=1/50", "T=inf", "T=nan"]
)
def test_an_optimiser_that_ends_worse_than_t_equals_1_gives_exactly_1(monkeypatch, end: float) -> None:
    """Calibrated logits (best T near 1): an optimiser ending at T = 50, 1/50, inf (every probability
    uniform) or NaN ends worse than T = 1 by the NLL, so exactly 1.0 is returned."""
    logits, labels = _calibrated(n=500)
    if math.isfinite(end):
        assert temperature_nll(logits, labels, math.exp(end)) > temperature_nll(logits, labels, 1.0)
    monkeypatch.setattr(_EndsAt, "END", end)
    monkeypatch.setattr(torch.optim, "LBFGS", _EndsAt)
    t = fit_temperature(logits, labels)
    assert t == 1.0 and isinstance(t, float)


def test_an_optimiser_that_ends_better_than_t_equals_1_is_kept(monkeypatch) -> None:
    """Logits over-confident by 3, an optimiser ending at T = 3: the guard keeps it (it is not always 1)."""
    logits, labels = _calibrated(n=500)
    monkeypatch.setattr(_EndsAt, "END", math.log(3.0))
    monkeypatch.setattr(torch.optim, "LBFGS", _EndsAt)
    assert fit_temperature(3 * logits, labels) == pytest.approx(3.0, rel=1e-12)


def test_multilabel_uses_one_temperature_for_every_sigmoid() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(3000, 4, generator=gen)
    targets = torch.bernoulli(torch.sigmoid(logits), generator=gen)
    t = fit_temperature(logits * 2.5, targets)
    assert t == pytest.approx(2.5, rel=0.1)
    assert temperature_nll(logits * 2.5, targets, t) == pytest.approx(
        F.binary_cross_entropy_with_logits(logits.double() * 2.5 / t, targets.double()).item()
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_multilabel_nll_is_computed_in_float64_whatever_the_targets_dtype(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = 3 * torch.randn(200, 4, generator=gen)
    targets = torch.bernoulli(torch.sigmoid(logits), generator=gen)
    exact = F.binary_cross_entropy_with_logits(logits.double() / 1.7, targets.double()).item()
    assert temperature_nll(logits, targets.to(dtype), 1.7) == pytest.approx(exact, rel=1e-12)
    assert temperature_nll(logits, targets) == pytest.approx(temperature_nll(logits, targets, 1.0), rel=1e-15)


def test_max_iter_reaches_the_optimiser(monkeypatch) -> None:
    seen = []

    class Recording(torch.optim.LBFGS):
        def __init__(self, params, **kwargs) -> None:
            seen.append(kwargs["max_iter"])
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "LBFGS", Recording)
    logits, labels = _calibrated(n=50)
    fit_temperature(logits, labels, max_iter=7)
    fit_temperature(logits, labels)
    assert seen == [7, 100]


@pytest.mark.parametrize("temperature", [0, -1.0, "2", None])
def test_a_temperature_that_is_not_a_positive_number_is_refused(temperature) -> None:
    logits, labels = _calibrated(n=10)
    with pytest.raises(ValueError, match=rf"temperature={temperature!r} must be a number > 0"):
        temperature_nll(logits, labels, temperature)


@pytest.mark.parametrize(
    "logits, labels, message",
    [
        ([[0.0, 1.0]], torch.tensor([0]), "logits and labels must be tensors, got list and Tensor"),
        (torch.zeros(1, 2), [0], "logits and labels must be tensors, got Tensor and list"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), "logits must be a float (N, C) tensor"),
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), "logits must be a float (N, C)"),
        (torch.zeros(4, 3), torch.zeros(4, 2), "labels must be (N,) integer class indices or (N, C)"),
        (torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.long), "labels must be (N,) integer class indices"),
        (torch.zeros(4, 3), torch.zeros(4), "labels must be (N,) integer class indices"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.bool), "labels must be (N,) integer class indices"),
        (torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), r"^labels .*; pass the labels the logits were computed for\.$"),
        (torch.full((2, 3), float("nan")), torch.zeros(2, dtype=torch.long), "NaN or inf"),
        (torch.zeros(2, 3), torch.full((2, 3), 0.5), "must be 0 or 1"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "N >= 1"),
    ],
)
def test_bad_inputs_are_refused(logits, labels, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
        fit_temperature(logits, labels)
