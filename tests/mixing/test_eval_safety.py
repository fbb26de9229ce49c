"""Eval safety beyond tests/mixing/test_mixer.py (which covers plan() + forward under eval, no_grad and
inference_mode, and an armed plan surviving an eval forward) and the Lightning / fastai integration tests:
validation passes of every kind never mix, never consume an armed plan, never draw from the mixer's
generator, and never make a training forward fail afterwards.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import pytest
import torch
from torch import nn

from hookmix import FitConfig, HookMixer, fit


def model_and_batch() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


VALIDATION_CONTEXTS = {
    "eval": lambda: nullcontext(),
    "eval + enable_grad": lambda: torch.enable_grad(),
    "train + no_grad": lambda: torch.no_grad(),
    "train + inference_mode": lambda: torch.inference_mode(),
    "eval + inference_mode": lambda: torch.inference_mode(),
}


def validate(
    model: nn.Module, name: str, x: torch.Tensor, mixer: HookMixer | None = None, y: torch.Tensor | None = None
) -> torch.Tensor:
    """One validation forward in the mode/grad context ``name`` (calling ``mixer.plan`` first, as a shared
    train/validation step does); the model goes back to train mode."""
    model.train(name.startswith("train"))
    context: ContextManager = VALIDATION_CONTEXTS[name]()
    with context:
        if mixer is not None:
            assert not mixer.plan(y).mixed
        out = model(x).detach().clone()
    model.train()
    return out


@pytest.mark.parametrize("name", list(VALIDATION_CONTEXTS))
def test_validation_between_plan_and_forward_neither_mixes_nor_consumes_the_plan(name: str) -> None:
    model, x, y = model_and_batch()
    reference = nn.Sequential(*model)  # same modules, never hooked by a mixer
    with torch.no_grad():
        expected = reference.train(name.startswith("train"))(x)
    model.train()
    hidden = {}
    with HookMixer(model, "1", seed=0) as mixer:
        step = mixer.plan(y)
        assert torch.equal(validate(model, name, x), expected)
        model[2].register_forward_pre_hook(lambda m, args: hidden.__setitem__("mixed", args[0].detach()))
        model(x)  # the training forward still gets the armed plan
        assert mixer.steps == 1
    bn_out = model[1](model[0](x)).detach()
    torch.testing.assert_close(
        hidden["mixed"], torch.lerp(bn_out[step.perm], bn_out, step.lam.view(-1, 1)), rtol=1e-4, atol=1e-5
    )  # BN in train mode: batch statistics of this x


def test_validation_with_shared_step_code_leaves_the_training_plans_unchanged() -> None:
    """A Lightning-style loop whose validation_step calls mixer.plan too: the training stream of plans is
    exactly that of a loop without validation, and every validation output is the plain model's."""

    def train(with_validation: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        model, x, y = model_and_batch()
        plans = []
        with HookMixer(model, ["0", "1"], lam_mode="sample", seed=3) as mixer:
            for epoch in range(3):
                for _ in range(4):
                    step = mixer.plan(y)
                    model(x)
                    plans.append((step.lam, step.perm))
                if with_validation:
                    for name in VALIDATION_CONTEXTS:
                        out = validate(model, name, x, mixer, y)
                        with torch.no_grad():
                            plain = nn.Sequential(*model).train(name.startswith("train"))(x)
                        model.train()
                        assert torch.equal(out, plain)
            assert mixer.steps == 12
        return plans

    for (lam, perm), (lam_v, perm_v) in zip(train(False), train(True), strict=True):
        assert torch.equal(lam, lam_v) and torch.equal(perm, perm_v)


@pytest.mark.parametrize("grad_context", ["no_grad", "inference_mode"])
def test_a_training_plan_is_not_spent_by_a_forward_without_grad(grad_context: str) -> None:
    model, x, y = model_and_batch()
    with HookMixer(model, "1", seed=0) as mixer:
        mixer.plan(y)
        with torch.no_grad() if grad_context == "no_grad" else torch.inference_mode():
            model(x)
        with pytest.raises(ValueError, match="never used.*train mode with grad enabled"):
            mixer.plan(y)  # the mistake is reported, not silently absorbed by the no-grad forward


def test_a_mixer_created_under_inference_mode_trains_normally() -> None:
    model, x, y = model_and_batch()
    with torch.inference_mode():
        mixer = HookMixer(model, "1", num_classes=3, seed=0)
    with mixer:
        step = mixer.plan(y)
        loss = step.loss(nn.CrossEntropyLoss(), model(x))
        loss.backward()
    assert step.mixed and model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_fit_validation_logits_are_the_plain_eval_forward() -> None:
    model, x, y = model_and_batch()
    result = fit(model, "1", x, y, x, y, FitConfig(epochs=2, batch_size=4), num_classes=3, progress=False)
    model.eval()
    with torch.no_grad():
        assert torch.equal(result.val_logits, model(x))
