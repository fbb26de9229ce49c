import sys

import pytest
import torch
from torch import nn

from hookmix.app.digits import (
    MAX_SHOTS,
    DigitsCNN,
    TransferSplit,
    all_digits,
    digits_transfer,
    pretrain_source,
    source_split,
)
from hookmix.evaluation.metrics import accuracy
from hookmix.headonly.digits_source import _train_source

DIGITS_PER_CLASS = {5: 182, 6: 181, 7: 179, 8: 174, 9: 180}


def _sorted_examples(x: torch.Tensor, y: torch.Tensor) -> list[tuple[float, ...]]:
    """(label, *pixels) rows in sorted order: a multiset of labelled images."""
    return sorted(tuple(row.tolist()) for row in torch.cat([y[:, None].float(), x.flatten(1)], dim=1))


@pytest.mark.parametrize("k", [1, 5, 20])
def test_transfer_split_shapes_and_exact_shots(k: int) -> None:
    split = digits_transfer(k, seed=3)
    assert isinstance(split, TransferSplit)
    assert split.class_names == ("5", "6", "7", "8", "9") and split.num_classes == 5
    assert split.train_x.shape == (5 * k, 1, 8, 8) and split.train_x.dtype == torch.float32
    assert split.train_y.shape == (5 * k,) and split.train_y.dtype == torch.int64
    assert torch.bincount(split.train_y, minlength=5).tolist() == [k] * 5
    expected_val = [DIGITS_PER_CLASS[d] - k for d in (5, 6, 7, 8, 9)]
    assert torch.bincount(split.val_y, minlength=5).tolist() == expected_val
    assert split.val_x.shape == (sum(expected_val), 1, 8, 8)
    assert split.train_x.min() >= 0.0 and split.train_x.max() <= 1.0 and split.train_x.max() == 1.0


def test_transfer_train_and_val_partition_digits_5_to_9() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = digits.target >= 5
    images = torch.as_tensor(digits.images[keep], dtype=torch.float32) / 16.0
    relabelled = torch.as_tensor(digits.target[keep]) - 5
    split = digits_transfer(10, seed=0)
    # every labelled 5-9 image appears exactly once across train and val (a multiset: a few images repeat)
    combined = _sorted_examples(torch.cat([split.train_x, split.val_x]), torch.cat([split.train_y, split.val_y]))
    assert combined == _sorted_examples(images, relabelled)


def test_transfer_split_is_seeded() -> None:
    first, again, other = digits_transfer(5, seed=7), digits_transfer(5, seed=7), digits_transfer(5, seed=8)
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.train_y, again.train_y)
    assert torch.equal(first.val_x, again.val_x) and torch.equal(first.val_y, again.val_y)
    assert not torch.equal(first.train_x, other.train_x)


def test_source_split_holds_digits_0_to_4() -> None:
    split = source_split()
    assert split.class_names == ("0", "1", "2", "3", "4")
    assert len(split.train_y) == 721 and len(split.val_y) == 180
    assert set(split.train_y.tolist()) == set(split.val_y.tolist()) == {0, 1, 2, 3, 4}


def test_digits_cnn_stages_are_top_level_cut_points() -> None:
    model = DigitsCNN(num_classes=7)
    assert [name for name, _ in model.named_children()] == ["stem", "stage1", "stage2", "head"]
    shapes = {}
    for name, child in model.named_children():
        child.register_forward_hook(lambda m, a, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
    out = model(torch.rand(3, 1, 8, 8))
    assert shapes == {"stem": (3, 16, 8, 8), "stage1": (3, 32, 4, 4), "stage2": (3, 64, 2, 2), "head": (3, 7)}
    assert out.shape == (3, 7)
    assert isinstance(model.head[-1], nn.Linear) and model.head[-1].in_features == 64


def test_pretrained_source_is_accurate_and_fresh_per_call() -> None:
    split = source_split()
    model = pretrain_source(seed=0)
    assert not model.training
    with torch.no_grad():
        assert accuracy(model(split.val_x), split.val_y) > 0.95
    # each call returns a new model: changing one leaves the cached weights intact
    with torch.no_grad():
        model.head[-1].weight.zero_()
    again = pretrain_source(seed=0)
    assert again is not model and again.head[-1].weight.abs().sum() > 0


def test_source_training_is_bitwise_deterministic_and_seeded() -> None:
    rng_state, threads = torch.get_rng_state(), torch.get_num_threads()
    first, again, other = _train_source(1, 2, False), _train_source(1, 2, False), _train_source(2, 2, False)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is not consumed
    assert torch.get_num_threads() == threads  # training runs single-threaded, then restores the count
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["stem.0.weight"], other["stem.0.weight"])


@pytest.mark.parametrize("k", [0, MAX_SHOTS + 1, 2.0, True])
def test_digits_transfer_rejects_bad_k(k: object) -> None:
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 100\]"):
        digits_transfer(k, seed=0)  # type: ignore[arg-type]


def test_bad_seed_and_epochs() -> None:
    with pytest.raises(TypeError, match="seed must be an int"):
        digits_transfer(5, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed must lie in"):
        pretrain_source(seed=-1)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        pretrain_source(seed=0, epochs=0)
    with pytest.raises(ValueError, match="num_classes"):
        DigitsCNN(num_classes=0)


def test_missing_scikit_learn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install hookmix\[data\]"):
        all_digits.__wrapped__()
