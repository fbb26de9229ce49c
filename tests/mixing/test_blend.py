from dataclasses import dataclass

import torch

from hookmix.mixing.blend import mix_structure, mix_tensor
from hookmix.mixing.plan import MixPlan
from tests.conftest import expected_mix


def test_mix_tensor_is_the_lerp_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, 3, 3, generator=g)
    lam = torch.rand(6, generator=g)
    perm = torch.tensor([1, 2, 3, 4, 5, 0])
    torch.testing.assert_close(mix_tensor(a, lam, perm), expected_mix(a, lam, perm))


def test_rows_with_lambda_one_are_bitwise_unchanged():
    a = torch.randn(4, 5)
    lam = torch.tensor([1.0, 0.3, 1.0, 0.8])
    out = mix_tensor(a, lam, torch.tensor([1, 0, 3, 2]))
    assert torch.equal(out[0], a[0]) and torch.equal(out[2], a[2])
    assert not torch.equal(out[1], a[1])


def test_sequence_first_batch_dim():
    a = torch.randn(7, 4, 3)  # (N, B, D)
    lam = torch.tensor([0.2, 0.9, 0.5, 0.6])
    perm = torch.tensor([3, 2, 0, 1])
    out = mix_tensor(a, lam, perm, batch_dim=1)
    ref = expected_mix(a.transpose(0, 1), lam, perm).transpose(0, 1)
    torch.testing.assert_close(out, ref)


def test_dtype_and_channels_last_are_kept():
    a = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last).bfloat16()
    out = mix_tensor(a, torch.full((4,), 0.25), torch.tensor([1, 0, 3, 2]))
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)


@dataclass
class Pair:
    features: torch.Tensor
    mask: torch.Tensor


def test_nested_outputs_mix_only_batch_float_leaves():
    a, b = torch.randn(4, 3), torch.randn(4, 2, 2)
    mask = torch.ones(4, 3, dtype=torch.bool)
    other = torch.randn(5)  # no batch dim of size 4
    lam, perm = torch.full((4,), 0.7), torch.tensor([1, 2, 3, 0])
    plan = MixPlan(lam, perm, ("x",), True, 0)
    out, count, kept = mix_structure(({"a": a, "idx": torch.arange(4)}, [b, other], Pair(a, mask)), plan)
    assert count == 3 and kept is None
    torch.testing.assert_close(out[0]["a"], expected_mix(a, lam, perm))
    torch.testing.assert_close(out[1][0], expected_mix(b, lam, perm))
    assert torch.equal(out[0]["idx"], torch.arange(4)) and out[1][1] is other
    assert isinstance(out[2], Pair) and out[2].mask is mask
    torch.testing.assert_close(out[2].features, expected_mix(a, lam, perm))
