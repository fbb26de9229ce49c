"""Temperature scaling (hookmix.calibration): the fitted T minimises the NLL, never worsens it, and
recovers a known temperature."""

import pytest
import torch
import torch.nn.functional as F

from hookmix.calibration import fit_temperature, temperature_nll
from hookmix.metrics import ece


def _calibrated(n: int = 4000, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is the true class distribution: labels are drawn from it."""
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, classes, generator=gen)
    labels = torch.multinomial(F.softmax(logits, 1), 1, generator=gen).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 2.0])
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


def test_multilabel_uses_one_temperature_for_every_sigmoid() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(3000, 4, generator=gen)
    targets = torch.bernoulli(torch.sigmoid(logits), generator=gen)
    t = fit_temperature(logits * 2.5, targets)
    assert t == pytest.approx(2.5, rel=0.1)
    assert temperature_nll(logits * 2.5, targets, t) == pytest.approx(
        F.binary_cross_entropy_with_logits(logits.double() * 2.5 / t, targets.double()).item()
    )


@pytest.mark.parametrize(
    "logits, labels, message",
    [
        (torch.zeros(4, 3), torch.zeros(4, 2), "labels must be (N,) integer class indices or (N, C)"),
        (torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), "labels"),
        (torch.full((2, 3), float("nan")), torch.zeros(2, dtype=torch.long), "NaN or inf"),
        (torch.zeros(2, 3), torch.full((2, 3), 0.5), "must be 0 or 1"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "N >= 1"),
    ],
)
def test_bad_inputs_are_refused(logits, labels, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit_temperature(logits, labels)
