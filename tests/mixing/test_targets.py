"""MixStep's targets and loss (hookmix.mixing.targets): the user's criterion, mixed with the plan's λ and partners.

Bugs a maintainer could plausibly make here, and the test that catches each:

* λ and 1 − λ swapped, or the partner's labels taken from the wrong permutation:
  ``test_class_index_loss_mixing_equals_manual_formula``, ``test_batch_lambda_loss_is_the_users_criterion_mixed``
  (λ and partners recovered from the logits);
* the criterion's weight / ignore_index / smoothing / reduction dropped, or its ``reduction`` not restored:
  ``test_batch_lambda_loss_is_the_users_criterion_mixed``,
  ``test_per_row_reduction_reduces_to_the_batch_rule_and_to_the_plain_loss``;
* a per-row λ with a plain callable (no ``reduction`` attribute) weighing row i by its partner's λ_j:
  ``test_per_row_lambda_with_a_plain_per_row_callable_weighs_each_row_by_its_own_lambda``;
* a scalar callable accepted with a per-row λ: ``test_scalar_callable_with_per_row_lambda_is_refused``;
* soft / smoothed / multi-label targets not summing or mixing right:
  ``test_soft_targets_from_indices_sum_to_one_and_match_loss_mixing``,
  ``test_label_smoothing_equals_smoothed_loss_mixing``,
  ``test_multilabel_smoothing_treats_each_label_as_a_binary_target``;
* excluded classes mixed anyway: ``test_exclusion_keeps_rows_and_their_partners_unmixed`` and the
  exclusion tests after it.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hookmix import HookMixer, MixStep
from hookmix.mixing.plan import MixPlan
from tests.conftest import recover_mix


def mixer_for(**kwargs) -> tuple[HookMixer, nn.Module]:
    model = nn.Sequential(nn.Linear(4, 5))
    return HookMixer(model, "output", seed=kwargs.pop("seed", 0), **kwargs), model


def planned(mixer, model, y, b=None):
    step = mixer.plan(y)
    out = model(torch.randn(y.shape[0] if b is None else b, 4, generator=torch.Generator().manual_seed(3)))
    return step, out


def test_class_index_loss_mixing_equals_manual_formula():
    mixer, model = mixer_for(lam_mode="sample")
    y = torch.tensor([0, 1, 2, 3, 4, 1, 2])
    step, out = planned(mixer, model, y)
    assert step.kind == "index"
    per_a = F.cross_entropy(out, y, reduction="none")
    per_b = F.cross_entropy(out, y[step.perm], reduction="none")
    manual = (step.lam * per_a + (1 - step.lam) * per_b).mean()
    criterion = nn.CrossEntropyLoss()
    torch.testing.assert_close(step.loss(criterion, out), manual)
    assert criterion.reduction == "mean"  # restored
    torch.testing.assert_close(step.loss(nn.CrossEntropyLoss(reduction="sum"), out), manual * 7)


def test_callables_per_row_and_per_batch():
    mixer, model = mixer_for()
    y = torch.tensor([0, 1, 2, 3])
    step, out = planned(mixer, model, y)
    lam = step.lam[0]
    manual = lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[step.perm])
    torch.testing.assert_close(step.loss(lambda o, t: F.cross_entropy(o, t), out), manual)
    torch.testing.assert_close(step.loss(lambda o, t: F.cross_entropy(o, t, reduction="none"), out), manual)


def test_scalar_callable_with_per_row_lambda_is_refused():
    mixer, model = mixer_for(lam_mode="sample")
    step, out = planned(mixer, model, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="per-row losses"):
        step.loss(lambda o, t: F.cross_entropy(o, t), out)


def test_soft_targets_from_indices_sum_to_one_and_match_loss_mixing():
    mixer, model = mixer_for(num_classes=5, lam_mode="sample")
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    step, out = planned(mixer, model, y)
    t = step.targets
    assert t.shape == (6, 5) and torch.allclose(t.sum(1), torch.ones(6))
    torch.testing.assert_close(t[torch.arange(6), y], step.lam + (1 - step.lam) * (y[step.perm] == y))
    # cross-entropy is linear in its target: soft-target CE == loss mixing
    torch.testing.assert_close(F.cross_entropy(out, t), step.loss(nn.CrossEntropyLoss(), out))


def test_label_smoothing_equals_smoothed_loss_mixing():
    mixer, model = mixer_for(num_classes=5, label_smoothing=0.1)
    y = torch.tensor([0, 1, 2, 3, 4])
    step, out = planned(mixer, model, y)
    assert torch.allclose(step.targets.min(), torch.tensor(0.02))
    expected = step.lam[0] * F.cross_entropy(out, y, label_smoothing=0.1) + (1 - step.lam[0]) * F.cross_entropy(
        out, y[step.perm], label_smoothing=0.1
    )
    torch.testing.assert_close(step.loss(nn.CrossEntropyLoss(), out), expected)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.float16, torch.float32])
def test_one_hot_and_multilabel_any_dtype_become_mixed_floats(dtype):
    mixer, model = mixer_for(num_classes=5)
    y = (torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) > 0.5).to(dtype)
    step, out = planned(mixer, model, y)
    assert step.kind == "label"
    lam = step.lam[:, None]
    torch.testing.assert_close(step.targets, lam * y.float() + (1 - lam) * y.float()[step.perm])
    assert step.targets.dtype == torch.float32
    bce = nn.BCEWithLogitsLoss()
    torch.testing.assert_close(step.loss(bce, out), F.binary_cross_entropy_with_logits(out, step.targets))


@pytest.mark.parametrize("shape", [(6,), (6, 3)])
def test_regression_targets_are_mixed(shape):
    mixer, model = mixer_for()
    y = torch.randn(*shape) * 10
    step, out = planned(mixer, model, y)
    assert step.kind == "regression"
    lam = step.lam.view(-1, *([1] * (len(shape) - 1)))
    torch.testing.assert_close(step.targets, lam * y + (1 - lam) * y[step.perm])


def test_exclusion_keeps_rows_and_their_partners_unmixed():
    mixer, model = mixer_for(num_classes=5, exclude_classes=[4], lam_mode="sample", seed=1)
    for _ in range(10):
        y = torch.randint(0, 5, (8,))
        step, _ = planned(mixer, model, y)
        touched = (y == 4) | (y[step.perm] == 4)
        assert torch.all(step.lam[touched] == 1.0)
        assert torch.all(step.lam[~touched] < 1.0)
        assert torch.all(step.targets[touched].max(1).values == 1.0)


def test_exclusion_for_multilabel_rows():
    mixer, model = mixer_for(num_classes=3, exclude_classes=[2], seed=2)
    y = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 1, 0], [1, 0, 0]])
    step, _ = planned(mixer, model, y)
    touched = (y[:, 2] > 0) | (y[step.perm][:, 2] > 0)
    assert touched.any() and torch.all(step.lam[touched] == 1.0) and torch.all(step.lam[~touched] < 1)


def test_unmixed_step_gives_plain_loss_and_targets():
    mixer, model = mixer_for(num_classes=5, prob=0.0)
    y = torch.tensor([0, 1, 2])
    step, out = planned(mixer, model, y)
    assert not step.mixed
    torch.testing.assert_close(step.loss(nn.CrossEntropyLoss(), out), F.cross_entropy(out, y))
    assert torch.equal(step.targets, F.one_hot(y, 5).float())


@pytest.mark.parametrize(
    "kwargs, y, error, match",
    [
        ({"num_classes": 5}, torch.tensor([0, 5]), ValueError, "num_classes=5"),
        ({}, torch.tensor([0, -1]), ValueError, ">= 0"),
        ({"targets": "index"}, torch.tensor([0.0, 1.0]), TypeError, "integer"),
        ({"targets": "label"}, torch.tensor([[0.0, 2.0], [1.0, 0.0]]), ValueError, r"\[0, 1\]"),
        ({}, torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), ValueError, "NaN"),
        ({}, torch.zeros(2, 2, 2), ValueError, "shape"),
        ({"num_classes": 3}, torch.zeros(2, 4, dtype=torch.long), ValueError, "columns"),
    ],
)
def test_bad_targets(kwargs, y, error, match):
    mixer, _ = mixer_for(**kwargs)
    with pytest.raises(error, match=match):
        mixer.plan(y)


def test_soft_targets_need_num_classes():
    mixer, model = mixer_for()
    step, _ = planned(mixer, model, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        step.targets


def raw_and_mixed_logits(mixer: HookMixer, model: nn.Module, y: torch.Tensor):
    """Plan a step, run the model, and recover λ and the partners from the logits themselves."""
    x = torch.randn(y.shape[0], 4, generator=torch.Generator().manual_seed(5))
    step = mixer.plan(y)
    out = model(x)
    lam, partner, residual = recover_mix(model[0](x).detach(), out.detach())
    assert residual.max() < 1e-5
    return step, out, lam, partner


CRITERIA = {
    "weight": lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])),
    "ignore_index": lambda: nn.CrossEntropyLoss(ignore_index=1),
    "label_smoothing": lambda: nn.CrossEntropyLoss(label_smoothing=0.2),
    "all_three": lambda: nn.CrossEntropyLoss(
        weight=torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), ignore_index=1, label_smoothing=0.2
    ),
    "weight_sum": lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), reduction="sum"),
    "nll_weight": lambda: nn.Sequential(nn.LogSoftmax(dim=1), nn.NLLLoss(weight=torch.tensor([5.0, 1, 1, 1, 2]))),
}


@pytest.mark.parametrize("name", list(CRITERIA))
def test_batch_lambda_loss_is_the_users_criterion_mixed(name):
    """λ·criterion(out, y) + (1−λ)·criterion(out, y[perm]) with the criterion as given (the old per-row
    mean divided weighted losses by B: 3.21 instead of 1.29 on a 4-class example)."""
    criterion = CRITERIA[name]()
    loss_fn = (lambda o, t: criterion[1](criterion[0](o), t)) if isinstance(criterion, nn.Sequential) else criterion
    mixer, model = mixer_for()
    y = torch.tensor([0, 1, 2, 3, 4, 1, 2, 0])
    step, out, lam, partner = raw_and_mixed_logits(mixer, model, y)
    expected = lam[0] * loss_fn(out, y) + (1 - lam[0]) * loss_fn(out, y[partner])
    torch.testing.assert_close(step.loss(loss_fn, out), expected, rtol=1e-5, atol=1e-6)


def fixed_step(lam: torch.Tensor, y: torch.Tensor, uniform: bool) -> MixStep:
    plan = MixPlan(lam=lam, perm=torch.roll(torch.arange(len(y)), 1), layers=("output",), mixed=True, step=0)
    return MixStep(plan=plan, y=y, kind="index", num_classes=5, label_smoothing=0.0, uniform_lam=uniform)


@pytest.mark.parametrize("name", [n for n in CRITERIA if n != "nll_weight"])
def test_per_row_reduction_reduces_to_the_batch_rule_and_to_the_plain_loss(name):
    criterion = CRITERIA[name]()
    y = torch.tensor([0, 1, 2, 3, 4, 1, 2, 0])
    out = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    equal = torch.full((8,), 0.3)
    torch.testing.assert_close(
        fixed_step(equal, y, False).loss(criterion, out), fixed_step(equal, y, True).loss(criterion, out)
    )
    torch.testing.assert_close(fixed_step(torch.ones(8), y, False).loss(criterion, out), criterion(out, y))
    # with different λ per row: the criterion's rows mixed, over the rows' mixed weights (mean) or summed
    lam = torch.linspace(0.2, 0.9, 8)
    step = fixed_step(lam, y, False)
    y_b = y[step.perm]
    per_row = nn.CrossEntropyLoss(
        weight=criterion.weight,
        ignore_index=criterion.ignore_index,
        label_smoothing=criterion.label_smoothing,
        reduction="none",
    )
    mixed = lam * per_row(out, y) + (1 - lam) * per_row(out, y_b)
    weights = torch.ones(5) if criterion.weight is None else criterion.weight
    w_a, w_b = weights[y] * (y != criterion.ignore_index), weights[y_b] * (y_b != criterion.ignore_index)
    expected = mixed.sum() if criterion.reduction == "sum" else mixed.sum() / (lam * w_a + (1 - lam) * w_b).sum()
    torch.testing.assert_close(step.loss(criterion, out), expected)
    assert criterion.reduction in ("mean", "sum")  # restored


def per_row_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A plain callable without a ``reduction`` attribute that returns one loss per row (B,)."""
    return F.cross_entropy(output, target, reduction="none")


def test_per_row_lambda_with_a_plain_per_row_callable_weighs_each_row_by_its_own_lambda():
    """λ and partners recovered from the logits: row i's loss is λ_i·l(out_i, y_i) + (1−λ_i)·l(out_i, y_j),
    averaged over the rows; weighing row i by its partner's λ_j instead gives another number."""
    mixer, model = mixer_for(lam_mode="sample", seed=2)
    y = torch.tensor([0, 1, 2, 3, 4, 1, 2, 0])
    step, out, lam, partner = raw_and_mixed_logits(mixer, model, y)
    assert (lam - lam[partner]).abs().max() > 0.1  # the rows' own λ and their partners' differ
    own = lam * per_row_cross_entropy(out, y) + (1 - lam) * per_row_cross_entropy(out, y[partner])
    theirs = lam[partner] * per_row_cross_entropy(out, y) + (1 - lam[partner]) * per_row_cross_entropy(out, y[partner])
    assert (own.mean() - theirs.mean()).abs() > 1e-3
    assert not hasattr(per_row_cross_entropy, "reduction")
    torch.testing.assert_close(step.loss(per_row_cross_entropy, out), own.mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_class_indices_of_any_integer_dtype_work_like_int64(dtype):
    results = {}
    for d in (torch.int64, dtype):
        torch.manual_seed(0)
        mixer, model = mixer_for(num_classes=5, lam_mode="sample")
        y = torch.tensor([0, 1, 2, 3, 4, 1]).to(d)
        step, out = planned(mixer, model, y)
        results[d] = (step.loss(nn.CrossEntropyLoss(), out), step.targets)
    torch.testing.assert_close(results[dtype], results[torch.int64])


def test_bool_targets_with_two_classes_are_class_indices():
    mixer, model = mixer_for(num_classes=2)
    model[0] = nn.Linear(4, 2)
    y = torch.tensor([True, False, True, True])
    step, out = planned(mixer, model, y)
    assert step.kind == "index"
    lam = step.lam[0]
    expected = lam * F.cross_entropy(out, y.long()) + (1 - lam) * F.cross_entropy(out, y.long()[step.perm])
    torch.testing.assert_close(step.loss(nn.CrossEntropyLoss(), out), expected)


def test_class_index_beyond_the_logits_is_a_hookmix_error_naming_index_and_width():
    mixer, model = mixer_for()
    step, out = planned(mixer, model, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match=r"class index 7 but the output has 5 columns"):
        step.loss(nn.CrossEntropyLoss(), out)


def test_multilabel_smoothing_treats_each_label_as_a_binary_target():
    mixer, model = mixer_for(num_classes=5, targets="multilabel", label_smoothing=0.1, prob=0.0)
    y = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    step, _ = planned(mixer, model, y)
    torch.testing.assert_close(step.targets, y.float() * 0.9 + 0.05)
    mixer, model = mixer_for(num_classes=5, targets="label", label_smoothing=0.1)
    with pytest.raises(ValueError, match="targets='multilabel'"):
        mixer.plan(y)


@pytest.mark.parametrize("kind, smoothing", [("label", 0.1), ("multilabel", 0.1), ("label", 0.0)])
def test_exclusion_with_smoothed_or_soft_labels_decides_on_the_hard_labels(kind, smoothing):
    classes = torch.tensor([0, 1, 2, 3, 2, 0, 1, 3])
    hard = F.one_hot(classes, 4).float()
    soft = hard * (1 - smoothing) + smoothing / (2 if kind == "multilabel" else 4)
    if smoothing == 0.0:
        soft = torch.softmax(hard * 3, dim=1)  # soft labels: every entry > 0
    mixer, model = mixer_for(num_classes=4, targets=kind, exclude_classes=[2], lam_mode="sample", seed=4)
    model[0] = nn.Linear(4, 4)
    step, _ = planned(mixer, model, soft)
    touched = (classes == 2) | (classes[step.perm] == 2)
    assert torch.all(step.lam[touched] == 1.0) and torch.all(step.lam[~touched] < 1.0)


def test_a_refused_plan_is_not_counted():
    mixer, model = mixer_for(num_classes=5, exclude_classes=[1])
    with pytest.raises(ValueError, match="exclude_classes needs class targets"):
        mixer.plan(batch_size=4)
    assert mixer.steps == 0
    fresh, _ = mixer_for(num_classes=5, exclude_classes=[1])
    y = torch.tensor([0, 2, 3, 4])
    assert torch.equal(mixer.plan(y).lam, fresh.plan(y).lam)
