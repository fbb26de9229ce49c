import math

import pytest
import torch
import torch.nn.functional as F

from hookmix.metrics import Reliability, accuracy, ece, evaluate, mean_ci, nll, reliability


def _logits_from_probs(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def test_accuracy_counts_top1_hits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 2])
    assert accuracy(logits, y) == pytest.approx(0.5)


def test_nll_equals_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 7, generator=gen) * 3
    y = torch.randint(0, 7, (64,), generator=gen)
    assert nll(logits, y) == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    # hand value: uniform logits over C classes -> log C
    assert nll(torch.zeros(5, 4), torch.tensor([0, 1, 2, 3, 0])) == pytest.approx(math.log(4))


def test_perfect_confident_classifier_has_zero_ece() -> None:
    y = torch.tensor([0, 1, 2, 1, 0])
    logits = F.one_hot(y, 3).double() * 100.0
    assert ece(logits, y) == pytest.approx(0.0, abs=1e-12)
    assert evaluate(logits, y) == pytest.approx({"accuracy": 1.0, "nll": 0.0, "ece": 0.0}, abs=1e-12)


def test_ece_of_a_constructed_case() -> None:
    # Two confidence groups: 0.9 (4 examples, 3 right) and 0.6 (6 examples, 3 right).
    # ECE = 0.4 * |0.75 - 0.9| + 0.6 * |0.5 - 0.6| = 0.06 + 0.06 = 0.12
    high = [[0.9, 0.1]] * 4
    low = [[0.6, 0.4]] * 6
    probs = high + low
    y = torch.tensor([0, 0, 0, 1] + [0, 0, 0, 1, 1, 1])
    expected = 0.4 * 0.15 + 0.6 * 0.1
    assert ece(_logits_from_probs(probs), y, n_bins=10) == pytest.approx(expected, abs=1e-12)


def test_ece_treats_logits_that_look_like_probabilities_as_logits_as_nll_does() -> None:
    """One convention for NLL and ECE: rows in [0, 1] summing to 1 are still logits (softmaxed)."""
    looks_like_probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0])
    conf = looks_like_probs.softmax(1).max(1).values
    correct = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    # one bin holds all three confidences (0.55..0.74): |mean accuracy - mean confidence|
    assert ece(looks_like_probs, y, n_bins=1) == pytest.approx(abs(correct.mean() - conf.mean()).item(), abs=1e-12)
    assert evaluate(looks_like_probs, y)["nll"] == pytest.approx(nll(looks_like_probs, y))


def test_reliability_bins() -> None:
    probs = [[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 6
    y = torch.tensor([0, 0, 0, 1, 0, 0, 0, 1, 1, 1])
    rel = reliability(_logits_from_probs(probs), y, n_bins=4)
    assert isinstance(rel, Reliability)
    assert rel.edges.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert rel.count.tolist() == [0, 0, 6, 4]
    assert rel.confidence[2].item() == pytest.approx(0.6)
    assert rel.accuracy[2].item() == pytest.approx(0.5)
    assert rel.confidence[3].item() == pytest.approx(0.9)
    assert rel.accuracy[3].item() == pytest.approx(0.75)
    assert torch.isnan(rel.accuracy[:2]).all() and torch.isnan(rel.confidence[:2]).all()
    assert rel.ece == pytest.approx(0.12)


def test_reliability_bins_are_closed_on_the_right() -> None:
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]], dtype=torch.float64)
    rel = reliability(probs.log(), torch.tensor([0, 0, 1]), n_bins=4)
    # 0.5 -> (0.25, 0.5], 0.75 -> (0.5, 0.75], 1.0 -> (0.75, 1]
    assert rel.count.tolist() == [0, 1, 1, 1]


def test_ece_matches_a_direct_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(500, 5, generator=gen) * 2
    y = torch.randint(0, 5, (500,), generator=gen)
    conf, pred = logits.double().softmax(1).max(1)
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            gap = (pred[inside] == y[inside]).double().mean() - conf[inside].mean()
            total += inside.double().mean().item() * abs(gap.item())
    assert ece(logits, y) == pytest.approx(total, abs=1e-9)


def test_mean_ci_hand_calculation() -> None:
    # values 1..5: mean 3, sample sd sqrt(2.5), t_{0.975, 4} = 2.7764451051977987
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == pytest.approx(3.0)
    assert half == pytest.approx(2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5), rel=1e-9)
    # two values, 90 %: t_{0.95, 1} = 6.313751514675043, sd = sqrt(2), n = 2
    mean, half = mean_ci([0.5, 2.5], level=0.9)
    assert (mean, half) == pytest.approx((1.5, 6.313751514675043 * math.sqrt(2) / math.sqrt(2)), rel=1e-9)


def test_mean_ci_single_value_has_nan_half_width() -> None:
    mean, half = mean_ci([0.7])
    assert mean == 0.7 and math.isnan(half)


@pytest.mark.parametrize("df", [1, 2, 3, 9, 29, 30, 31, 200, 5000])
@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.99, 0.999])
def test_mean_ci_matches_scipy(df: int, level: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    values = [float(i % 3) for i in range(df + 1)]
    _, half = mean_ci(values, level)
    n = len(values)
    sd = torch.tensor(values, dtype=torch.float64).std().item()
    assert half == pytest.approx(stats.t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n), rel=1e-9)


@pytest.mark.parametrize(
    ("logits", "y", "match"),
    [
        (torch.zeros(3), torch.tensor([0, 1, 0]), r"\(B, C\)"),
        (torch.zeros(3, 2, dtype=torch.long), torch.tensor([0, 1, 0]), "floating-point"),
        (torch.zeros(3, 2), torch.tensor([0.0, 1.0, 0.0]), "integer"),
        (torch.zeros(3, 2), torch.tensor([0, 1]), "3 rows but y has 2"),
        (torch.zeros(3, 2), torch.tensor([0, 2, 1]), r"\[0, 1\].*got values in \[0, 2\]"),
        (torch.zeros(3, 2), torch.tensor([0, -1, 1]), r"got values in \[-1, 1\]"),
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "at least one"),
        (torch.full((2, 2), math.nan), torch.tensor([0, 1]), "NaN"),
    ],
)
def test_input_validation(logits: torch.Tensor, y: torch.Tensor, match: str) -> None:
    for fn in (accuracy, nll, ece, evaluate):
        with pytest.raises(ValueError, match=match):
            fn(logits, y)


def test_argument_validation() -> None:
    with pytest.raises(TypeError, match="torch.Tensor"):
        accuracy([[0.0, 1.0]], torch.tensor([1]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_bins"):
        ece(torch.zeros(2, 2), torch.tensor([0, 1]), n_bins=0)
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="finite"):
        mean_ci([1.0, math.nan])
    with pytest.raises(TypeError, match="sequence"):
        mean_ci(3.0)  # type: ignore[arg-type]
