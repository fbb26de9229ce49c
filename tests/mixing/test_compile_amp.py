"""The hook under torch.compile, autocast and channels_last, through the public HookMixer API."""

import pytest
import torch
from torch import nn

from hookmix import HookMixer
from tests.conftest import expected_mix


def conv_net() -> nn.Sequential:
    """conv -> BN -> relu ("2", mixed, (B, 8, H, W)) -> conv -> relu -> pool -> linear (B, 5)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 5),
        )


def batch(rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, 3, 8, 8, generator=g), torch.randint(0, 5, (rows,), generator=g)


def train_step(
    model: nn.Module, run: nn.Module, mixer: HookMixer, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One hooked step through ``run`` (the model or its compiled wrapper): loss and parameter grads."""
    model.zero_grad()
    loss = mixer.plan(y).loss(nn.CrossEntropyLoss(), run(x))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
def test_compiled_hooked_model_has_no_graph_break_and_matches_eager() -> None:
    torch._dynamo.reset()
    model, (x, y) = conv_net(), batch()
    with HookMixer(model, "2", alpha=0.4, seed=0) as mixer:
        start, weights = mixer.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
        mixer.plan(y)
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        mixer.load_state_dict(start)
        eager = [train_step(model, model, mixer, x, y) for _ in range(3)]
        model.load_state_dict(weights)  # BatchNorm statistics back to the start, the same three plans again
        mixer.load_state_dict(start)
        compiled = torch.compile(model)
        compiled_steps = [train_step(model, compiled, mixer, x, y) for _ in range(3)]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        train_step(model, compiled, mixer, x, y)  # a fourth λ: no recompilation
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled_steps):
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        for grad_c, grad_e in zip(grads_c, grads_e):
            torch.testing.assert_close(grad_c, grad_e, rtol=1e-4, atol=1e-6)
    assert len({loss.item() for loss, _ in eager}) == 3


def capture_layer(model: nn.Sequential) -> dict[str, torch.Tensor]:
    """Record the mixed layer "2"'s raw output and what layer "3" received (hooks registered before the
    mixer's, so "raw" is unmixed)."""
    seen: dict[str, torch.Tensor] = {}
    model[2].register_forward_hook(lambda m, a, out: seen.__setitem__("raw", out.detach()))
    model[3].register_forward_pre_hook(lambda m, a: seen.__setitem__("mixed", a[0].detach()))
    return seen


def test_autocast_bf16_keeps_the_mixed_activation_in_bf16() -> None:
    model, (x, y) = conv_net(), batch()
    seen = capture_layer(model)
    with HookMixer(model, "2", alpha=0.4, seed=0) as mixer, torch.autocast("cpu", dtype=torch.bfloat16):
        step = mixer.plan(y)
        loss = step.loss(nn.CrossEntropyLoss(), model(x))
    loss.backward()
    assert seen["raw"].dtype == seen["mixed"].dtype == torch.bfloat16
    reference = expected_mix(seen["raw"].float(), step.lam, step.perm)
    torch.testing.assert_close(seen["mixed"].float(), reference, rtol=1e-2, atol=1e-2)
    assert not torch.equal(seen["mixed"], seen["raw"])
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_channels_last_stays_channels_last() -> None:
    model, (x, y) = conv_net(), batch()
    model = model.to(memory_format=torch.channels_last)
    seen = capture_layer(model)
    with HookMixer(model, "2", alpha=0.4, seed=0) as mixer:
        step = mixer.plan(y)
        model(x.to(memory_format=torch.channels_last))
    assert seen["raw"].is_contiguous(memory_format=torch.channels_last)
    assert seen["mixed"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(seen["mixed"], expected_mix(seen["raw"], step.lam, step.perm), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("guard_hooks", [False, True])
def test_hooks_on_a_second_instance_of_a_compiled_class_need_hook_guards(guard_hooks: bool) -> None:
    """Documented limit: dynamo skips guards on module hooks by default, so a hooked model whose class was
    compiled before without hooks reuses that graph and the mixer says so at the next plan(). With
    ``skip_nnmodule_hook_guards=False`` from the first compile on, the hooked instance gets its own graph."""
    torch._dynamo.reset()
    x, y = batch()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=not guard_hooks):
        torch.compile(conv_net(), backend="aot_eager")(x)
        hooked = conv_net()
        seen = capture_layer(hooked)
        with HookMixer(hooked, "2", alpha=0.4, seed=0) as mixer:
            step = mixer.plan(y)
            torch.compile(hooked, backend="aot_eager")(x)
            if guard_hooks:
                mixer.plan(y)
                torch.testing.assert_close(seen["mixed"], expected_mix(seen["raw"], step.lam, step.perm))
            else:
                with pytest.raises(ValueError, match="never (used|called that layer)"):
                    mixer.plan(y)
    torch._dynamo.reset()
