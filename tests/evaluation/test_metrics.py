"""hookmix.evaluation.metrics: accuracy, NLL, ECE and reliability; multi-label mAP / F1 / thresholds; mean_ci.

Bugs a maintainer could plausibly make here, and the test that catches each:

* ECE binned wrongly (bins open on the wrong side, probabilities read as logits, bins not passed on):
  ``test_ece_of_a_constructed_case``, ``test_reliability_bins_are_closed_on_the_right``,
  ``test_ece_treats_logits_that_look_like_probabilities_as_logits_as_nll_does``,
  ``test_evaluate_passes_its_bins_on_and_defaults_to_15``, ``test_multilabel_ece_uses_the_bins_it_is_given``;
* the t quantile / incomplete beta off (a wrong branch of the continued fraction, wrong ends):
  ``test_mean_ci_matches_scipy``, ``test_incomplete_beta_matches_scipy_on_both_sides_of_the_switch_and_at_the_ends``;
  a level of 0 or 1 accepted: ``test_mean_ci_refuses_a_level_outside_the_open_unit_interval``;
* tuned thresholds not the best F1 (a cut dropped when precision + recall <= 1):
  ``test_tuned_thresholds_reach_the_best_f1_over_every_cut``,
  ``test_the_best_f1_cut_wins_even_when_precision_plus_recall_is_at_most_one``;
* the largest of tied thresholds chosen, or equal F1s compared after a float32 rounding that breaks the tie:
  ``test_of_thresholds_with_equal_f1_the_smallest_wins``;
* the reported F1 divided in float32 (torchmetrics' ``binary_f1_score``) instead of exactly from the counts:
  ``test_f1_is_the_exact_fraction_of_the_counts``;
* thresholds rounded through float32, or 0 and 1 refused: ``test_thresholds_are_kept_in_float64_and_may_be_0_or_1``;
* a label without positives dragging mAP / F1 to 0: ``test_no_positive_at_all_gives_nan_map_and_f1``,
  ``test_tuned_thresholds_reach_the_best_f1_over_every_cut``;
* bad inputs accepted: ``test_input_validation``, ``test_multilabel_input_validation``,
  ``test_apply_thresholds_refuses_logits_that_are_not_a_float_matrix``,
  ``test_reliability_multilabel_refuses_a_label_that_is_not_a_column``.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from hookmix.evaluation.metrics import (
    ReliabilityCurve,
    accuracy,
    apply_thresholds,
    ece,
    evaluate,
    evaluate_multilabel,
    mean_ci,
    nll,
    reliability,
    reliability_multilabel,
    tune_thresholds,
)


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
    assert isinstance(rel, ReliabilityCurve)
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


def test_ece_equals_torchmetrics_multiclass_calibration_error() -> None:
    """The hand-written ECE against torchmetrics' ``MulticlassCalibrationError`` (L1, same bins)."""
    from torchmetrics.classification import MulticlassCalibrationError

    gen = torch.Generator().manual_seed(0)
    for classes in (2, 5, 10):
        for scale in (0.5, 2.0, 6.0):
            logits = torch.randn(1000, classes, generator=gen) * scale
            y = torch.randint(0, classes, (1000,), generator=gen)
            for n_bins in (10, 15):
                theirs = MulticlassCalibrationError(num_classes=classes, n_bins=n_bins, norm="l1")(logits, y)
                assert ece(logits, y, n_bins) == pytest.approx(theirs.item(), abs=1e-6)


def test_ece_differs_from_torchmetrics_only_where_documented() -> None:
    """Two conventions differ. torchmetrics closes its bins on the left and gives a confidence of exactly
    1.0 a bin of its own; hookmix closes bins on the right. And torchmetrics takes inputs inside [0, 1]
    as probabilities, while hookmix always treats its input as logits (as nll does)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    # confidence 1.0 (wrong) and 0.95 (right): one bin (0.9333, 1] here, acc 0.5 vs conf 0.975 -> 0.475;
    # torchmetrics: 0.5 * |1 - 0.95| + 0.5 * |0 - 1.0| = 0.525
    logits = torch.tensor([[100.0, 0.0], [math.log(0.95), math.log(0.05)]], dtype=torch.float64)
    y = torch.tensor([1, 0])
    assert ece(logits, y) == pytest.approx(0.475, abs=1e-12)
    assert multiclass_calibration_error(logits, y, 2).item() == pytest.approx(0.525, abs=1e-6)
    in_unit = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    probs_taken_as_such = multiclass_calibration_error(in_unit, torch.tensor([0, 1]), 2).item()
    assert probs_taken_as_such == pytest.approx(0.2, abs=1e-6)  # confidences 0.9, 0.7, both right
    assert ece(in_unit, torch.tensor([0, 1])) != pytest.approx(0.2, abs=1e-3)  # softmax: 0.69, 0.6


def _logit(p: list[list[float]]) -> torch.Tensor:
    probs = torch.tensor(p, dtype=torch.float64)
    return (probs / (1 - probs)).log()


# Two labels, four examples, probabilities away from the edges of 10 bins; hand values:
# label 0: p .95 .85 .75 .15, t 1 0 1 0 -> AP (1 + 2/3) / 2 = 5/6; F1@0.5 (TP 2, FP 1) = 0.8; ECE 1.3 / 4
# label 1: p .35 .65 .25 .55, t 1 0 0 1 -> AP (1/2 + 2/3) / 2 = 7/12; F1@0.5 (TP 1, FP 1, FN 1) = 0.5; ECE 2 / 4
HAND_LOGITS = _logit([[0.95, 0.35], [0.85, 0.65], [0.75, 0.25], [0.15, 0.55]])
HAND_TARGETS = torch.tensor([[1, 1], [0, 0], [1, 0], [0, 1]])


def test_multilabel_metrics_of_a_hand_case() -> None:
    found = evaluate_multilabel(HAND_LOGITS, HAND_TARGETS, n_bins=10)
    assert found["per_label_ap"] == pytest.approx([5 / 6, 7 / 12], abs=1e-6)
    assert found["map"] == pytest.approx((5 / 6 + 7 / 12) / 2, abs=1e-6)
    assert found["per_label_f1"] == pytest.approx([0.8, 0.5], abs=1e-6)
    assert found["f1"] == pytest.approx(0.65, abs=1e-6)
    assert found["per_label_ece"] == pytest.approx([1.3 / 4, 2.0 / 4], abs=1e-9)
    assert found["ece"] == pytest.approx((1.3 / 4 + 2.0 / 4) / 2, abs=1e-9)
    p = torch.tensor([0.95, 0.85, 0.75, 0.15, 0.35, 0.65, 0.25, 0.55], dtype=torch.float64)
    t = torch.tensor([1, 0, 1, 0, 1, 0, 0, 1], dtype=torch.float64)
    bce = -(t * p.log() + (1 - t) * (1 - p).log()).mean().item()
    assert found["nll"] == pytest.approx(bce, rel=1e-9)
    assert found["labels_with_positives"] == 2 and found["thresholds"] == [0.5, 0.5]


def test_thresholds_tuned_by_hand() -> None:
    # label 0 at .75: TP 2, FP 1 -> F1 0.8 (best); label 1 at .35: TP 2, FP 1 -> 0.8 (the 0.5 default gives 0.5)
    thresholds = tune_thresholds(HAND_LOGITS, HAND_TARGETS)
    assert thresholds.dtype == torch.float64 and thresholds.tolist() == pytest.approx([0.75, 0.35], abs=1e-12)
    found = evaluate_multilabel(HAND_LOGITS, HAND_TARGETS, thresholds)
    assert found["per_label_f1"] == pytest.approx([0.8, 0.8], abs=1e-6)
    assert found["thresholds"] == thresholds.tolist()
    assert apply_thresholds(HAND_LOGITS, thresholds).tolist() == [[1, 1], [1, 1], [1, 0], [0, 1]]
    assert apply_thresholds(HAND_LOGITS, [0.5, 0.5]).tolist() == [[1, 0], [1, 1], [1, 0], [0, 1]]


def _f1_by_hand(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    tp = int((predicted & truth).sum())
    return 2 * tp / (int(predicted.sum()) + int(truth.sum())) if tp else 0.0


def test_tuned_thresholds_reach_the_best_f1_over_every_cut() -> None:
    gen = torch.Generator().manual_seed(4)
    targets = torch.rand(150, 5, generator=gen) < 0.3
    logits = torch.randn(150, 5, generator=gen) + 1.5 * targets
    targets[:, 4] = False  # a label without positives
    thresholds = tune_thresholds(logits, targets)
    tuned = evaluate_multilabel(logits, targets, thresholds)
    at_half = evaluate_multilabel(logits, targets)
    probs = logits.double().sigmoid()
    for j in range(4):
        best = max(_f1_by_hand(probs[:, j] >= cut, targets[:, j]) for cut in probs[:, j].tolist())
        assert tuned["per_label_f1"][j] == pytest.approx(best, abs=1e-6)
        assert tuned["per_label_f1"][j] >= at_half["per_label_f1"][j] - 1e-9
    assert tuned["f1"] > at_half["f1"]
    assert thresholds[4].item() == 0.5 and math.isnan(tuned["per_label_f1"][4]) and math.isnan(tuned["per_label_ap"][4])
    assert tuned["labels_with_positives"] == 4
    assert tuned["map"] == pytest.approx(sum(tuned["per_label_ap"][:4]) / 4, abs=1e-12)
    assert len(tuned["per_label_ece"]) == 5 and not math.isnan(tuned["per_label_ece"][4])


def test_map_equals_torchmetrics_macro_and_perfect_logits_score_one() -> None:
    from torchmetrics.classification import MultilabelAveragePrecision

    gen = torch.Generator().manual_seed(5)
    targets = (torch.rand(80, 6, generator=gen) < 0.4).long()
    logits = torch.randn(80, 6, generator=gen) + targets
    theirs = MultilabelAveragePrecision(num_labels=6, average="macro")(logits, targets).item()
    assert evaluate_multilabel(logits, targets)["map"] == pytest.approx(theirs, abs=1e-6)
    perfect = evaluate_multilabel(targets * 20.0 - 10.0, targets)
    assert (perfect["map"], perfect["f1"]) == pytest.approx((1.0, 1.0), abs=1e-12)
    assert perfect["ece"] < 1e-4


def test_no_positive_at_all_gives_nan_map_and_f1() -> None:
    found = evaluate_multilabel(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(6, 3))
    assert math.isnan(found["map"]) and math.isnan(found["f1"]) and found["labels_with_positives"] == 0
    assert math.isfinite(found["nll"]) and math.isfinite(found["ece"])


def test_reliability_multilabel_bins_probabilities_against_positive_rates() -> None:
    pooled = reliability_multilabel(HAND_LOGITS, HAND_TARGETS, n_bins=10)
    assert pooled.count.tolist() == [0, 1, 1, 1, 0, 1, 1, 1, 1, 1]
    assert pooled.accuracy[3].item() == 1.0 and pooled.confidence[3].item() == pytest.approx(0.35)
    assert pooled.ece == pytest.approx(3.3 / 8, abs=1e-12)
    assert reliability_multilabel(HAND_LOGITS, HAND_TARGETS, n_bins=10, label=1).ece == pytest.approx(0.5)
    gen = torch.Generator().manual_seed(6)
    targets = torch.rand(300, 4, generator=gen) < 0.5
    logits = torch.randn(300, 4, generator=gen) * 2 + targets
    per_label = evaluate_multilabel(logits, targets)["per_label_ece"]
    for j in range(4):
        assert reliability_multilabel(logits, targets, label=j).ece == pytest.approx(per_label[j], abs=1e-9)


def test_reliability_multilabel_draws_with_plot_reliability(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from hookmix.evaluation.plots import plot_reliability

    curve = reliability_multilabel(HAND_LOGITS, HAND_TARGETS)
    assert plot_reliability({"multi-label": curve}, tmp_path / "r.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("logits", "targets", "error", "match"),
    [
        ([[0.0]], torch.ones(1, 1), TypeError, "must be torch.Tensors"),
        (torch.zeros(3), torch.ones(3), ValueError, r"floating-point \(N, L\) tensor"),
        (torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), ValueError, "floating-point"),
        (torch.zeros(0, 2), torch.ones(0, 2), ValueError, "N >= 1"),
        (torch.zeros(3, 2), torch.ones(3, 3), ValueError, r"targets have shape \(3, 3\) but logits \(3, 2\)"),
        (torch.zeros(2, 2), torch.tensor([[0.3, 1.0], [0.0, 2.0]]), ValueError, r"multi-hot.*such as 0\.3, 2;"),
        (torch.full((2, 2), math.nan), torch.ones(2, 2), ValueError, "NaN"),
    ],
)
def test_multilabel_input_validation(logits: torch.Tensor, targets: torch.Tensor, error: type, match: str) -> None:
    for fn in (tune_thresholds, evaluate_multilabel, reliability_multilabel):
        with pytest.raises(error, match=match):
            fn(logits, targets)


def test_multilabel_argument_validation() -> None:
    logits, targets = torch.zeros(2, 2), torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=r"thresholds must be 2 probabilities in \[0, 1\].*\[0\.5\]"):
        evaluate_multilabel(logits, targets, [0.5])
    with pytest.raises(ValueError, match=r"thresholds must be 2 probabilities.*1\.5"):
        apply_thresholds(logits, torch.tensor([0.5, 1.5]))
    with pytest.raises(TypeError, match="thresholds must be a"):
        apply_thresholds(logits, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logits must be a floating-point"):
        apply_thresholds(torch.zeros(2, dtype=torch.long), [0.5])
    with pytest.raises(ValueError, match="n_bins must be a positive int"):
        evaluate_multilabel(logits, targets, n_bins=0)
    with pytest.raises(ValueError, match=r"label=2 must be a column index in \[0, 1\]"):
        reliability_multilabel(logits, targets, label=2)


@pytest.mark.parametrize("a, b", [(0.5, 0.5), (1.5, 15.0), (10.0, 0.5), (50.0, 60.0)])
def test_incomplete_beta_matches_scipy_on_both_sides_of_the_switch_and_at_the_ends(a: float, b: float) -> None:
    """``_betainc`` (behind :func:`mean_ci`'s t quantiles) against scipy, on x below and above (a+1)/(a+b+2)
    (where it switches to 1 - I_{1-x}(b, a)), and exactly 0 and 1 at the ends."""
    from scipy.special import betainc

    from hookmix.evaluation.metrics import _betainc

    switch = (a + 1) / (a + b + 2)
    for x in (1e-6, 0.5 * switch, switch, 0.5 * (1 + switch), 1 - 1e-6, 0.999999999):
        assert _betainc(a, b, x) == pytest.approx(betainc(a, b, x), rel=1e-10, abs=1e-14), x
    assert _betainc(a, b, 0.0) == 0.0 and _betainc(a, b, 1.0) == 1.0
    assert _betainc(a, b, -0.5) == 0.0 and _betainc(a, b, 1.5) == 1.0


def test_the_best_f1_cut_wins_even_when_precision_plus_recall_is_at_most_one() -> None:
    """One label, 10 rows, positives ranked 2nd and 10th: the best F1 (0.5, precision = recall = 0.5) takes
    the top two; predicting every row gives only 0.33."""
    probs = torch.tensor([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    truth = torch.zeros(10, 1, dtype=torch.bool)
    truth[[1, 9], 0] = True
    logits = torch.logit(probs)[:, None]
    thresholds = tune_thresholds(logits, truth)
    assert apply_thresholds(logits, thresholds)[:, 0].tolist() == [True, True] + [False] * 8
    assert evaluate_multilabel(logits, truth, thresholds)["f1"] == pytest.approx(0.5, abs=1e-9)


def test_thresholds_are_kept_in_float64_and_may_be_0_or_1() -> None:
    logits = torch.tensor([[0.0, 3.0], [-2.0, 40.0]])
    targets = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    found = evaluate_multilabel(logits, targets, [0.3, 0.7])
    assert found["thresholds"] == [0.3, 0.7]  # not 0.30000001192092896: no float32 round trip
    assert apply_thresholds(logits, [0.0, 1.0]).tolist() == [[True, False], [True, True]]
    assert evaluate_multilabel(logits, targets, (0.0, 1.0))["thresholds"] == [0.0, 1.0]


@pytest.mark.parametrize(
    "logits", [[[0.0, 1.0]], torch.zeros(4), torch.zeros(4, 2, dtype=torch.long)], ids=["list", "1d", "int"]
)
def test_apply_thresholds_refuses_logits_that_are_not_a_float_matrix(logits) -> None:
    with pytest.raises((TypeError, ValueError), match="logits"):
        apply_thresholds(logits, [0.5, 0.5])


def test_multilabel_ece_uses_the_bins_it_is_given() -> None:
    """With one bin each label's ECE is |mean probability - positive rate| (checked by hand)."""
    gen = torch.Generator().manual_seed(6)
    logits = 2 * torch.randn(40, 3, generator=gen)
    targets = (torch.rand(40, 3, generator=gen) < 0.4).float()
    by_hand = (logits.double().sigmoid().mean(0) - targets.double().mean(0)).abs()
    found = evaluate_multilabel(logits, targets, n_bins=1)
    assert found["per_label_ece"] == pytest.approx(by_hand.tolist(), abs=1e-9)
    assert found["ece"] == pytest.approx(by_hand.mean().item(), abs=1e-9)
    assert evaluate_multilabel(logits, targets)["ece"] != pytest.approx(found["ece"], abs=1e-6)


def test_evaluate_passes_its_bins_on_and_defaults_to_15() -> None:
    gen = torch.Generator().manual_seed(7)
    logits, y = 2 * torch.randn(60, 4, generator=gen), torch.randint(0, 4, (60,), generator=gen)
    logits[:30] += 6 * F.one_hot(y[:30], 4)  # confident and right: under-confident bins beside over-confident ones
    confidence = logits.double().softmax(1).max(1).values
    one_bin = (confidence.mean() - (logits.argmax(1) == y).double().mean()).abs().item()
    assert evaluate(logits, y, n_bins=1)["ece"] == pytest.approx(one_bin, abs=1e-12)
    assert evaluate(logits, y)["ece"] == ece(logits, y, n_bins=15) != ece(logits, y, n_bins=16)


@pytest.mark.parametrize("level", [0.0, 1.0, 1.5])
def test_mean_ci_refuses_a_level_outside_the_open_unit_interval(level: float) -> None:
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0, 4.0], level=level)


@pytest.mark.parametrize("label", [-1, 2, 1.0])
def test_reliability_multilabel_refuses_a_label_that_is_not_a_column(label) -> None:
    with pytest.raises(ValueError, match="label"):
        reliability_multilabel(torch.zeros(3, 2), torch.zeros(3, 2), label=label)


def test_of_thresholds_with_equal_f1_the_smallest_wins() -> None:
    """The documented tie-break, the smallest threshold among equal F1s. Nine rows at .9, .8, ..., .1.
    Label 0, positives at .9 and .6: cutting at .9 (TP 1 of 1) and at .6 (TP 2 of 4) both give F1 2/3, the
    best. Label 1, positives at .9, .5 and .1: .9, .5 and .1 all give F1 1/2 (2·TP / (predicted + 3)), a
    three-way tie. Label 2, positives ranked 1, 3, 4, 7, 9 and 12 of 12 rows: cutting at the 9th row (TP 5 of
    9) and at the last (TP 6 of 12) both give 2/3, which torchmetrics' float32 precision and recall round
    to two F1s an ulp apart (the bug this caught: the larger threshold won). A largest-wins rule gives .9,
    .9 and the 9th row's probability."""
    probs = torch.linspace(0.9, 0.1, 9, dtype=torch.float64)
    truth = torch.zeros(9, 2, dtype=torch.bool)
    truth[[0, 3], 0] = True
    truth[[0, 4, 8], 1] = True
    probs12 = torch.linspace(0.95, 0.05, 12, dtype=torch.float64)
    truth12 = torch.zeros(12, 1, dtype=torch.bool)
    truth12[[0, 2, 3, 6, 8, 11], 0] = True
    cases = [(probs[:, None].expand(9, 2), truth, [0.6, 0.1]), (probs12[:, None], truth12, [0.05])]
    for p, t, smallest in cases:
        for j in range(t.shape[1]):  # the ties, counted by hand
            f1 = [_f1_by_hand(p[:, j] >= cut, t[:, j]) for cut in p[:, j].tolist()]
            assert sum(abs(v - max(f1)) < 1e-12 for v in f1) >= 2
        thresholds = tune_thresholds(torch.logit(p), t)
        assert thresholds.tolist() == pytest.approx(smallest, abs=1e-12)
    assert evaluate_multilabel(torch.logit(probs12[:, None]), truth12, [0.05])["f1"] == pytest.approx(2 / 3, abs=1e-6)


def test_f1_is_the_exact_fraction_of_the_counts() -> None:
    """Per-label F1 is ``2·TP / (predicted + positives)`` counted by hand, divided once in float64: equal to
    the Python fraction exactly, not to 1e-6 (torchmetrics' float32 F1 gives 2/3 as 0.6666666865). Four
    labels of 200 random rows at random thresholds, and one label whose F1 is 2/3: TP 2, 3 predicted, 3
    positives."""
    gen = torch.Generator().manual_seed(8)
    targets = torch.rand(200, 4, generator=gen) < 0.3
    logits = torch.randn(200, 4, generator=gen) + targets
    thresholds = torch.rand(4, generator=gen, dtype=torch.float64) * 0.6 + 0.2
    found = evaluate_multilabel(logits, targets, thresholds)
    predicted = logits.double().sigmoid() >= thresholds
    by_hand = [_f1_by_hand(predicted[:, j], targets[:, j]) for j in range(4)]
    assert found["per_label_f1"] == by_hand and found["f1"] == math.fsum(by_hand) / 4
    assert len({round(v, 3) for v in by_hand}) == 4 and all(0.1 < v < 0.9 for v in by_hand)  # 4 distinct, not 0/1
    two_thirds = evaluate_multilabel(_logit([[0.9], [0.8], [0.7], [0.2]]), torch.tensor([[1], [1], [0], [1]]))
    assert two_thirds["per_label_f1"] == [2 / 3] and two_thirds["f1"] == 2 / 3
