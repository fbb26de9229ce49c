"""The replay of mixed forwards inside backward (:class:`hookmix.mixing.replay.BackwardReplays`), on its own: a
backward finds the plan and cut of the forward it runs through, only while it runs, and the autograd graph
never keeps the mixer alive. ``tests/mixing/test_checkpointing.py`` checks the end result through the mixer: the
gradients of checkpointed models equal the plain ones in both ``use_reentrant`` modes.

Bugs a maintainer could plausibly make here, and the test that catches each:

* the replay found outside the backward that reaches it, for a layer the plan does not mix, or for a plan
  that does not mix: ``test_a_backward_finds_the_plan_and_cut_of_the_forward_it_runs_through``;
* a forward with several outputs filed once per output node, so its own backward is refused as "several
  forwards": ``test_a_forward_with_several_outputs_is_one_replay``;
* two forwards in one backward not refused (the recomputation would guess a plan), or refused for a layer
  neither mixes: ``test_two_forwards_in_one_backward_are_refused_only_for_a_layer_one_of_them_mixes``;
* the end-of-backward callback dropped (every plan kept for the mixer's life):
  ``test_a_backwards_replays_are_forgotten_when_it_ends``;
* the autograd hook holding the replays strongly (a kept graph keeps the mixer and its model alive):
  ``test_the_graph_holds_no_strong_reference_to_the_replays``.
"""

import gc
import weakref

import pytest
import torch

from hookmix.mixing.blend import Cut
from hookmix.mixing.plan import MixPlan, identity_plan
from hookmix.mixing.replay import BackwardReplays


def mixing_plan(layer: str = "a") -> MixPlan:
    return MixPlan(lam=torch.full((4,), 0.7), perm=torch.tensor([1, 2, 3, 0]), layers=(layer,), mixed=True, step=3)


def leaf() -> torch.Tensor:
    return torch.arange(4.0).requires_grad_(True)


def find_during_backward(replays: BackwardReplays, x: torch.Tensor, layers: list[str]) -> dict:
    """Register a hook on ``x`` that records ``replays.find(layer)`` for each layer when the backward
    reaches ``x`` (after the outputs' nodes)."""
    seen: dict = {}
    x.register_hook(lambda grad: seen.update({layer: replays.find(layer) for layer in layers}))
    return seen


def test_a_backward_finds_the_plan_and_cut_of_the_forward_it_runs_through() -> None:
    replays, plan, cut = BackwardReplays(), mixing_plan(), Cut(grid=(3, 3), kept=torch.full((4,), 0.7))
    x = leaf()
    y = x * 2
    replays.attach(y, (plan, cut))
    assert replays.find("a") is None  # attached, but no backward runs through it yet
    seen = find_during_backward(replays, x, ["a", "b"])
    y.sum().backward()
    assert seen["a"][0] is plan and seen["a"][1] is cut
    assert seen["b"] is None
    assert replays.find("a") is None  # that backward is over

    unmixed, x = BackwardReplays(), leaf()
    y = x * 2
    unmixed.attach(y, (identity_plan(4, 0), None))
    seen = find_during_backward(unmixed, x, ["a"])
    y.sum().backward()
    assert seen == {"a": None}


def test_a_forward_with_several_outputs_is_one_replay() -> None:
    replays, plan, x = BackwardReplays(), mixing_plan(), leaf()
    outputs = {"logits": x * 2, "features": x + 1}
    replays.attach(outputs, (plan, None))
    seen = find_during_backward(replays, x, ["a"])
    (outputs["logits"].sum() + outputs["features"].sum()).backward()
    assert seen["a"] == (plan, None)


def test_two_forwards_in_one_backward_are_refused_only_for_a_layer_one_of_them_mixes() -> None:
    replays, x = BackwardReplays(), leaf()
    first, second = x * 2, x * 3
    replays.attach(first, (mixing_plan("a"), None))
    replays.attach(second, (None, None))  # a forward that was not armed
    seen = find_during_backward(replays, x, ["b"])
    (first.sum() + second.sum()).backward(retain_graph=True)
    assert seen == {"b": None}

    x.register_hook(lambda grad: replays.find("a"))
    with pytest.raises(ValueError, match=r"layer 'a' .*gradient checkpointing.* 2 forwards.*backward after each"):
        (first.sum() + second.sum()).backward()


def test_a_backwards_replays_are_forgotten_when_it_ends() -> None:
    replays, plan, x = BackwardReplays(), mixing_plan(), leaf()
    y = x * 2
    replays.attach(y, (plan, None))
    y.sum().backward()
    kept = weakref.ref(plan)
    del y, plan  # the graph is freed with y; only the replays could still hold the plan
    gc.collect()
    assert kept() is None


def test_the_graph_holds_no_strong_reference_to_the_replays() -> None:
    replays, x = BackwardReplays(), leaf()
    y = x * 2
    replays.attach(y, (mixing_plan(), None))
    alive = weakref.ref(replays)
    del replays
    gc.collect()
    assert alive() is None
    y.sum().backward()  # the hook finds its replays gone and does nothing
    assert torch.equal(x.grad, torch.full((4,), 2.0))
