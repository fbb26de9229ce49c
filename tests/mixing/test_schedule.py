"""Schedules: mix probability, stopping after a step or an epoch, α changed between epochs — exactly
when told, and carried through state_dict."""

import pytest
import torch
from torch import nn

from hookmix import HookMixer


def make():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    return model, torch.randn(4, 3)


def run_steps(mixer, model, x, n):
    mixed = []
    for _ in range(n):
        step = mixer.plan(batch_size=4)
        model(x)
        mixed.append(step.mixed)
    return mixed


def test_stop_step_switches_off_exactly():
    model, x = make()
    with HookMixer(model, "0", stop_step=5, seed=0) as mixer:
        assert run_steps(mixer, model, x, 8) == [True] * 5 + [False] * 3
        assert mixer.mixed_steps == 5 and mixer.steps == 8


def test_stop_epoch_and_state_dict_round_trip():
    model, x = make()
    with HookMixer(model, "0", stop_epoch=2, seed=0) as mixer:
        for epoch in range(2):
            mixer.set_epoch(epoch)
            assert all(run_steps(mixer, model, x, 3))
        mixer.set_epoch(2)
        state = mixer.state_dict()
        assert not any(run_steps(mixer, model, x, 3))
    with HookMixer(model, "0", seed=0) as resumed:  # created without the schedule
        resumed.load_state_dict(state)
        assert resumed.epoch == 2 and not any(run_steps(resumed, model, x, 2))
        resumed.set_epoch(1)
        assert all(run_steps(resumed, model, x, 2))


def test_alpha_change_between_epochs_is_used_and_saved():
    model, x = make()
    with HookMixer(model, "0", alpha=0.4, lam_mode="sample", seed=0) as mixer:
        mixer.alpha = 50.0  # Beta(50, 50): λ concentrated near 0.5
        lams = []
        for _ in range(20):
            lams.append(mixer.plan(batch_size=4).lam)
            model(x)
        assert (torch.cat(lams) - 0.5).abs().max() < 0.25
        assert mixer.state_dict()["alpha"] == 50.0
        with pytest.raises(ValueError, match="alpha"):
            mixer.alpha = -1.0


def test_schedule_does_not_shift_later_plans():
    model, x = make()
    states = {}
    for stop in (None, 2):
        with HookMixer(model, "0", stop_step=stop, seed=3) as mixer:
            run_steps(mixer, model, x, 4)
            states[stop] = mixer.state_dict()["generator"]
    assert torch.equal(states[None], states[2])


def test_output_mixup_inside_a_manifold_list():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    plain = nn.Sequential(*model)
    x = torch.randn(6, 3)
    seen = set()
    with HookMixer(model, ["0", "output"], seed=1) as mixer:
        for _ in range(10):
            step = mixer.plan(batch_size=6)
            out = model(x)
            seen.add(step.layers)
            if step.layers == ("output",):
                lam = step.lam[:, None]
                torch.testing.assert_close(out, lam * plain(x) + (1 - lam) * plain(x)[step.perm])
    assert seen == {("0",), ("output",)}
