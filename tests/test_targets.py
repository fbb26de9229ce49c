import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hookmix import HookMixer


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
