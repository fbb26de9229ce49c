"""A plan lives until its backward is done: the replay of mixed forwards that gradient checkpointing recomputes.

Gradient checkpointing (timm ``set_grad_checkpointing``, ``torch.utils.checkpoint``) runs the hooked layer
again inside backward. The recomputed activations must be mixed with the same plan (λ, partners, cutmix
box) as the forward, or the gradients are those of an unmixed network. So when a forward ends, the mixer
leaves its :data:`Replay` — the plan and the cut the forward pasted — on the autograd nodes of the output
(:meth:`BackwardReplays.attach`). When backward reaches such a node, the replay is filed under that
backward's graph task, and a layer that runs while that backward lasts finds it (:meth:`BackwardReplays.find`)
and is mixed again the same way. A callback queued on the autograd engine forgets the task's replays when
its backward ends (as stanfordnlp/pyvene retires its state, PR 242).

The reentrant checkpoint runs the first forward under ``no_grad``, so this does not rely on grad mode inside
the checkpointed segment. It reads the current graph task through ``torch._C._current_graph_task_id`` and
queues the callback with ``Variable._execution_engine.queue_callback``: private autograd APIs, kept in this
module alone. Under ``torch.compile`` nothing is attached: the compiled graph recomputes without
Python hooks.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

from hookmix.core.errors import UsageError
from hookmix.core.tree import tensor_leaves
from hookmix.mixing.blend import Cut
from hookmix.mixing.plan import MixPlan

__all__ = ["BackwardReplays", "Replay"]

Replay = tuple[MixPlan | None, Cut | None]
"""What a backward needs to recompute a forward: its plan (``None``: not mixed) and the cut it pasted."""


def _on_backward(replays_ref: weakref.ref, replay: Replay, grad_outputs: Any) -> None:
    """Autograd pre-hook on a forward's output node: the backward now running recomputes that forward."""
    replays = replays_ref()
    if replays is not None:
        replays._reached(replay)


class BackwardReplays:
    """The replays of the forwards each running backward recomputes, by autograd graph task.

    The autograd nodes hold only a weak reference to it, so a graph kept alive does not keep the mixer alive.
    """

    def __init__(self) -> None:
        self._by_task: dict[int, list[Replay]] = {}

    def attach(self, output: Any, replay: Replay) -> None:
        """Leave ``replay`` on the autograd nodes of ``output`` (any structure) for the backward that reaches
        them; nothing when grad is off (no backward will come) or under ``torch.compile``."""
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        hook = functools.partial(_on_backward, weakref.ref(self), replay)
        nodes = {leaf.grad_fn for leaf in tensor_leaves(output) if leaf.grad_fn is not None}
        for node in nodes:
            node.register_prehook(hook)

    def _reached(self, replay: Replay) -> None:
        """The backward running now recomputes the forward of ``replay``; forget it when that backward ends."""
        task = torch._C._current_graph_task_id()
        replays = self._by_task.get(task)
        if replays is None:
            replays = self._by_task[task] = []
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._by_task.pop(task, None))
        if all(r is not replay for r in replays):
            replays.append(replay)

    def find(self, layer: str) -> tuple[MixPlan, Cut | None] | None:
        """The plan and cut to mix ``layer``'s output with when it is being recomputed inside a backward
        (``None``: it is not, or its forward did not mix that layer).

        Refuses a backward that recomputes several forwards at once, one of which mixed ``layer``: which
        plan each recomputation belongs to cannot be told.
        """
        if not self._by_task:
            return None
        replays = self._by_task.get(torch._C._current_graph_task_id())
        if not replays:
            return None
        mixing = [(plan, cut) for plan, cut in replays if plan is not None and plan.mixed and layer in plan.layers]
        if len(replays) > 1 and mixing:
            raise UsageError(
                f"layer {layer!r} is being recomputed inside a backward (gradient checkpointing) that runs through "
                f"{len(replays)} forwards of the model at once, so hookmix cannot tell which plan to mix it with. "
                "Call backward after each forward (e.g. loss.backward() per micro-batch when accumulating "
                "gradients), or turn gradient checkpointing off."
            )
        return mixing[0] if mixing else None

    def clear(self) -> None:
        """Forget every replay (the mixer is closed)."""
        self._by_task.clear()
