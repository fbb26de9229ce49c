import math

import pytest
import torch

from hookmix.core.checks import check_alpha
from hookmix.mixing.plan import PlanSampler
from hookmix.mixing.settings import MixSettings


def test_lambda_follows_beta_distribution():
    sampler = PlanSampler(["x"], MixSettings(alpha=0.4, lam_mode="sample"), seed=0)
    lam = torch.cat([sampler.draw(500).lam for _ in range(20)])
    # Beta(0.4, 0.4): mean 1/2, variance 1 / (4 (2α + 1)) = 1/7.2
    assert abs(lam.mean().item() - 0.5) < 0.02
    assert abs(lam.var().item() - 1 / 7.2) < 0.01
    assert ((lam >= 0) & (lam <= 1)).all()


def test_batch_mode_has_one_lambda_per_step():
    plan = PlanSampler(["x"], MixSettings(alpha=1.0), seed=1).draw(9)
    assert torch.all(plan.lam == plan.lam[0])


def test_partners_form_one_cycle_without_fixed_points():
    sampler = PlanSampler(["x"], seed=3)
    for b in (2, 3, 7, 32):
        perm = sampler.draw(b).perm
        assert sorted(perm.tolist()) == list(range(b))
        assert (perm != torch.arange(b)).all()
        # following partners from row 0 visits every row: a single cycle
        seen, row = set(), 0
        for _ in range(b):
            seen.add(row)
            row = int(perm[row])
        assert seen == set(range(b))


def test_batch_of_one_does_not_mix():
    plan = PlanSampler(["x"], seed=0).draw(1)
    assert not plan.mixed and plan.lam.tolist() == [1.0] and plan.perm.tolist() == [0]


def test_mix_probability_per_step():
    sampler = PlanSampler(["x"], MixSettings(prob=0.3), seed=0)
    mixed = [sampler.draw(4).mixed for _ in range(2000)]
    assert abs(sum(mixed) / 2000 - 0.3) < 0.04
    assert sampler.mixed_steps == sum(mixed) and sampler.steps == 2000
    assert not any(PlanSampler(["x"], MixSettings(prob=0.0), seed=0).draw(4).mixed for _ in range(50))


def test_dominant_keeps_own_sample_heavier():
    sampler = PlanSampler(["x"], MixSettings(lam_mode="sample", dominant=True), seed=0)
    assert (sampler.draw(256).lam >= 0.5).all()


def test_layer_draw_follows_weights_and_all_mode():
    sampler = PlanSampler(["a", "b"], MixSettings(weights=[1, 3]), seed=0)
    picks = [sampler.draw(4).layers for _ in range(2000)]
    assert all(len(p) == 1 for p in picks)
    assert abs(sum(p == ("b",) for p in picks) / 2000 - 0.75) < 0.04
    assert PlanSampler(["a", "b"], MixSettings(mode="all"), seed=0).draw(4).layers == ("a", "b")


def test_same_seed_same_plans_bitwise():
    s1, s2 = (
        PlanSampler(["a", "b"], MixSettings(lam_mode="sample"), seed=7),
        PlanSampler(["a", "b"], MixSettings(lam_mode="sample"), seed=7),
    )
    for b in (5, 8, 3):
        p1, p2 = s1.draw(b), s2.draw(b)
        assert torch.equal(p1.lam, p2.lam) and torch.equal(p1.perm, p2.perm) and p1.layers == p2.layers


def test_state_dict_resumes_the_same_stream():
    full = PlanSampler(["a", "b"], MixSettings(prob=0.7), seed=11)
    first = [full.draw(6) for _ in range(5)]
    state = full.state_dict()
    rest = [full.draw(6) for _ in range(5)]
    resumed = PlanSampler(["a", "b"], MixSettings(prob=0.7), seed=0)
    resumed.load_state_dict(state)
    assert resumed.steps == 5 and resumed.mixed_steps == sum(p.mixed for p in first)
    for expected in rest:
        got = resumed.draw(6)
        assert torch.equal(got.lam, expected.lam) and torch.equal(got.perm, expected.perm)
        assert got.step == expected.step and got.mixed == expected.mixed


def test_state_dict_refuses_other_layers():
    state = PlanSampler(["a"], seed=0).state_dict()
    with pytest.raises(ValueError, match="layers"):
        PlanSampler(["b"], seed=0).load_state_dict(state)


@pytest.mark.parametrize("alpha", [0, -1, math.nan, math.inf])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        check_alpha(alpha)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prob": 1.5}, "prob"),
        ({"lam_mode": "row"}, "lam_mode"),
        ({"mode": "some"}, "mode"),
        ({"weights": [1.0]}, "one weight per layer"),
        ({"weights": [0, 0]}, "not all zero"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlanSampler(["a", "b"], MixSettings(**kwargs))
