"""No leaks: 10,000 hooked training steps keep memory flat and the model's hooks exactly those asked for;
a forward that raises leaves no armed plan and no extra hook; ``close()`` is idempotent.

RSS comes from ``/proc/self/statm`` (resident pages). The model is sized so that leaking one activation
per step (16 x 256 float32 = 16 KiB) would grow RSS by ~150 MiB over the measured 9,500 steps, and one
leaked Python object per step would add 9,500 gc-tracked objects; the tolerances are 8 MiB and 500.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from torch import nn

from hookmix import HookMixer

STEPS = 10_000
WARMUP = 500
RSS_TOLERANCE = 8 * 2**20
OBJECT_TOLERANCE = 500


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops: on a shared 2-core machine a second intra-op thread costs far more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def small_model() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def settled() -> tuple[int, int]:
    """(RSS in bytes, gc-tracked objects) after a full collection."""
    gc.collect()
    return rss_bytes(), len(gc.get_objects())


@pytest.mark.slow
def test_10k_hooked_steps_keep_memory_flat_and_hooks_exact() -> None:
    model = small_model()
    baseline_hooks = hook_count(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    data = torch.Generator().manual_seed(1)
    x_pool, y_pool = torch.randn(64, 16, 32, generator=data), torch.randint(0, 10, (64, 16), generator=data)
    hooks_seen = set()
    with HookMixer(model, ["0", "2"], lam_mode="sample", exclude_classes=[9], num_classes=10, seed=0) as mixer:
        expected_hooks = baseline_hooks + 2 + 2  # root pre + post hooks, one per layer asked for
        for step_index in range(STEPS):
            if step_index == WARMUP:
                rss_before, objects_before = settled()
            x, y = x_pool[step_index % 64], y_pool[step_index % 64]
            step = mixer.plan(y)
            loss = step.loss(criterion, model(x))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step_index % 1000 == 0:
                hooks_seen.add(hook_count(model))
                model.eval()
                with torch.inference_mode():
                    model(x)  # an occasional validation forward, as a real loop has
                model.train()
        rss_after, objects_after = settled()
        assert mixer.steps == STEPS and mixer.mixed_steps == STEPS
    assert hooks_seen == {expected_hooks}
    assert hook_count(model) == baseline_hooks
    growth = rss_after - rss_before
    assert growth < RSS_TOLERANCE, f"RSS grew {growth / 2**20:.1f} MiB over {STEPS - WARMUP} steps"
    assert objects_after - objects_before < OBJECT_TOLERANCE


class Boom(RuntimeError):
    pass


def raise_boom(*_: object) -> None:
    raise Boom


@pytest.mark.parametrize("where", ["before the layer", "in the mixing hook", "after the layer"])
def test_a_forward_that_raises_leaves_no_armed_plan_and_no_extra_hook(where: str) -> None:
    model = small_model()
    baseline = hook_count(model)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    plain, hidden = model(x).detach(), model[:3](x).detach()
    with HookMixer(model, "2", seed=0) as mixer:
        mixing_hooks = hook_count(model)
        for _ in range(50):
            if where == "in the mixing hook":  # a batch-size mismatch raises inside the layer hook
                mixer.plan(batch_size=6)
                with pytest.raises(ValueError, match="batch size 6"):
                    model(x)
            else:
                failing = model[0 if where == "before the layer" else 4].register_forward_hook(raise_boom)
                mixer.plan(batch_size=8)
                with pytest.raises(Boom):
                    model(x)
                failing.remove()
            assert hook_count(model) == mixing_hooks
            assert torch.equal(model(x), plain)  # train mode, no plan: a plan left active would mix here
        step = mixer.plan(batch_size=8)  # no "never used" / "never called" error: the failed plans were retired
        mixed = model(x)
    assert hook_count(model) == baseline
    expected = model[3:](torch.lerp(hidden[step.perm], hidden, step.lam.view(-1, 1)))
    torch.testing.assert_close(mixed, expected)
    assert not torch.allclose(mixed, plain)


def test_failing_forwards_do_not_accumulate_memory() -> None:
    model = small_model()
    x = torch.randn(8, 32)
    with HookMixer(model, "2", seed=0) as mixer:
        for round_index in range(2):
            for _ in range(300):
                mixer.plan(batch_size=6)
                with pytest.raises(ValueError):
                    model(x)
            if round_index == 0:
                objects_before = settled()[1]
        objects_after = settled()[1]
    assert objects_after - objects_before < 100  # 300 more failures: no traceback or plan kept alive


def test_close_is_idempotent_and_disarms_a_pending_plan() -> None:
    model = small_model()
    baseline = hook_count(model)
    x = torch.randn(4, 32)
    expected = nn.Sequential(*model)(x)
    mixer = HookMixer(model, ["0", "2"], mode="all", seed=0)
    step = mixer.plan(batch_size=4)
    assert step.mixed and hook_count(model) == baseline + 4
    mixer.close()
    mixer.close()
    with mixer:  # entering and leaving a closed mixer is harmless too
        pass
    assert mixer.closed and hook_count(model) == baseline
    assert torch.equal(model(x), expected)  # the armed plan died with the hooks
    with pytest.raises(ValueError, match="closed"):
        mixer.plan(batch_size=4)


def test_two_mixers_on_one_model_own_exactly_their_hooks() -> None:
    model = small_model()
    baseline = hook_count(model)
    first = HookMixer(model, "0", seed=0)
    second = HookMixer(model, ["2", "4"], mode="all", seed=1)
    assert hook_count(model) == baseline + 3 + 4
    first.close()
    assert hook_count(model) == baseline + 4
    step = second.plan(batch_size=4)
    model(torch.randn(4, 32))
    assert step.mixed and second.steps == 1 and first.steps == 0
    second.close()
    second.close()
    assert hook_count(model) == baseline
