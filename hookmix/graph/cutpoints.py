"""Which layers of a model are sound places to mix or to cut: cut points, stages, warnings.

A module is a *cut point* when its output dominates the model's output in the torch.fx graph: every
path of data from the input(s) to the output passes through it (ResNet ``layer3``, a ViT's
``blocks.5``). Only there does mixing a layer's output mix everything the rest of the network sees,
and only there can the model be cut into ``backbone`` (input -> that output) and ``head`` (that output
-> model output). Inside a residual block (``layer4.0.conv2``) the skip connection carries the unmixed
signal around the module: Manifold Mixup's authors warn that mixing there spoils the method.

The model is traced once per training mode (Python branches on ``self.training`` are frozen into a
traced graph) and the analysis is cached, keyed weakly by the model and dropped when its set of
modules changes. Modules the tracer keeps whole are those torchvision's and timm's feature
extractors keep whole.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import warnings
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import timm.layers
import torchvision
from torch import fx, nn

from hookmix.core.checks import modes_restored
from hookmix.core.errors import HookmixWarning, UsageError

__all__ = [
    "CutPointWarning",
    "CutPoints",
    "UntraceableError",
    "cut_points",
    "stage_names",
]

# torch.utils.checkpoint's reentrant mode warns when none of its inputs is a tensor that requires grad. During
# the trace its inputs are fx Proxies, not tensors, so it warns at every checkpointed call: a warning about
# the trace, not about the user's model (under `python -W error` it would make every such model untraceable).
_TRACE_CHECKPOINT_WARNING = "None of the inputs have requires_grad=True"

_TORCHVISION_OPS = tuple(
    obj for obj in vars(torchvision.ops).values() if isinstance(obj, type) and issubclass(obj, nn.Module)
)


class CutPointWarning(HookmixWarning):
    """A layer chosen for mixing is not a cut point, or the model could not be analysed."""


class UntraceableError(UsageError):
    """torch.fx cannot trace the model, so its cut points are unknown; ``reason`` is the tracer's."""

    def __init__(self, model_type: str, reason: str) -> None:
        super().__init__(
            f"cannot trace {model_type} with torch.fx ({reason}). This usually means Python control flow on "
            "tensor values (e.g. `if x.sum() > 0:`) in forward."
        )
        self.reason = reason


class _CutTracer(fx.Tracer):
    """An fx tracer that records what every module call returns, keyed by module name."""

    def __init__(self) -> None:
        super().__init__(
            autowrap_modules=(math, torchvision.ops),
            autowrap_functions=tuple(timm.layers.get_notrace_functions()),
        )
        self.leaves = _TORCHVISION_OPS + tuple(timm.layers.get_notrace_modules())
        self.outputs: dict[str, list[Any]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        self.outputs.setdefault(self.path_of_module(m), []).append(out)
        return out


def _default_arguments(model: nn.Module) -> dict[str, Any]:
    """``forward``'s arguments after the input that have defaults (e.g. timm ViT's ``attn_mask=None``).

    Tracing fixes them to their defaults; left symbolic, every block would read them from the model's
    input side and no block could be a cut point.
    """
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _call_result(out: Any) -> fx.Node | str:
    """What one module call returned: its graph node, or the type name of a non-tensor result."""
    return out.node if isinstance(out, fx.Proxy) else type(out).__name__


def _trace(model: nn.Module, training: bool) -> tuple[fx.Graph, dict[str, list[fx.Node | str]]]:
    """The graph of ``model`` in the given mode, and what each call of each module returned."""
    tracer = _CutTracer()
    with modes_restored(model, training), warnings.catch_warnings():
        warnings.filterwarnings(  # this one warning only, while tracing: the user's own warnings still show
            "ignore", re.escape(_TRACE_CHECKPOINT_WARNING), UserWarning, r"torch\.utils\.checkpoint\Z"
        )
        try:
            graph = tracer.trace(model, concrete_args=_default_arguments(model))
        except Exception as err:  # the tracer fails with whatever the model's forward raises on a Proxy
            lines = str(err).strip().splitlines()
            raise UntraceableError(
                type(model).__name__, f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
            ) from err
    # Nodes only: a Proxy holds the tracer, which holds the model (the cache must not keep it alive).
    return graph, {name: [_call_result(out) for out in calls] for name, calls in tracer.outputs.items()}


def _meet(a: fx.Node | None, b: fx.Node | None, idom: dict[fx.Node, fx.Node | None], order: dict[Any, int]) -> Any:
    """The nearest common dominator of ``a`` and ``b`` (``None``: the virtual source before every input)."""
    while a is not b:
        if order[a] > order[b]:
            a = idom[a]  # type: ignore[index]
        else:
            b = idom[b]  # type: ignore[index]
    return a


def _dominator_tree(graph: fx.Graph) -> tuple[dict[fx.Node, fx.Node | None], dict[Any, int]]:
    """Immediate dominators of the nodes computed from the model's inputs, and each node's position.

    One virtual source feeds every placeholder, so with several inputs (e.g. categorical and continuous
    columns) only a node that all of them flow through dominates. Parameters, buffers and what is
    computed from them alone are not on any path from the input and get no entry. An fx graph lists its
    nodes in topological order, so one pass of Cooper, Harvey and Kennedy's algorithm is exact.
    """
    order: dict[Any, int] = {None: -1}
    idom: dict[fx.Node, fx.Node | None] = {}
    for node in graph.nodes:
        order[node] = len(order)
        preds = [p for p in node.all_input_nodes if p in idom]
        if node.op == "placeholder":
            idom[node] = None
        elif preds:
            idom[node] = functools.reduce(lambda a, b: _meet(a, b, idom, order), preds)
    return idom, order


def _closure(start: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """``start`` and every node reached from it by repeating ``step``."""
    seen = {start}
    queue = deque([start])
    while queue:
        for nxt in step(queue.popleft()):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


class CutPoints:
    """The cut-point analysis of one model traced in one mode (get it from :func:`cut_points`).

    ``names`` lists the modules that are cut points in forward order (outer before inner when several
    modules share one output, e.g. ``layer4`` and ``layer4.1``); ``graph`` is the traced graph.
    """

    def __init__(self, model_type: str, graph: fx.Graph, calls: dict[str, list[fx.Node | str]]) -> None:
        self.model_type = model_type
        self.graph = graph
        self._calls = calls
        self._idom, self._order = _dominator_tree(graph)
        out = next(node for node in graph.nodes if node.op == "output")
        self._final = {p for p in out.all_input_nodes if p in self._idom}
        self._live = _closure(out, lambda n: (p for p in n.all_input_nodes if p in self._idom))
        dominators: set[fx.Node] = set()
        node = self._idom.get(out)
        while node is not None:
            dominators.add(node)
            node = self._idom[node]
        outputs = [(name, c[0]) for name, c in calls.items() if len(c) == 1 and isinstance(c[0], fx.Node)]
        outputs.sort(key=lambda item: (self._order[item[1]], item[0].count(".")))
        self._outputs: dict[str, fx.Node] = dict(outputs)
        self.names: tuple[str, ...] = tuple(name for name, node in outputs if node in dominators)
        self._names_at: dict[fx.Node, list[str]] = {}
        for name, node in outputs:
            self._names_at.setdefault(node, []).append(name)

    def depends_on_input(self, node: fx.Node) -> bool:
        """Whether ``node`` is computed from the model's input (not only from parameters and constants)."""
        return node in self._idom

    def node(self, name: str) -> fx.Node:
        """The graph node holding module ``name``'s output (``KeyError`` when it has no single one)."""
        return self._outputs[name]

    def is_cut_point(self, name: str) -> bool:
        return name in self.names

    def produces_output(self, name: str) -> bool:
        """Whether module ``name``'s output is (part of) what the model returns, e.g. the classifier's."""
        return self._outputs.get(name) in self._final

    def separates(self, names: Iterable[str]) -> bool:
        """Whether every path from the input to the output passes through the output of one of ``names``
        (modules called once), e.g. all the embeddings and the continuous branch of a tabular model."""
        blocked = {self._outputs[name] for name in names if name in self._outputs}
        out = next(node for node in self.graph.nodes if node.op == "output")
        sources = [node for node in self.graph.nodes if node.op == "placeholder"]
        return not any(out in _closure(s, lambda n: (u for u in n.users if u not in blocked)) for s in sources)

    def why_not(self, name: str) -> str | None:
        """Why module ``name`` is not a cut point, as a phrase following "it" (``None`` when it is one)."""
        if name in self.names:
            return None
        calls = self._calls.get(name, [])
        if not calls:
            return (
                "is not reached by the traced forward (forward never calls it, or it runs inside a module "
                "the tracer keeps whole)"
            )
        if len(calls) > 1:
            return f"is called {len(calls)} times by forward, so its output is not one point of the network"
        if isinstance(calls[0], str):
            return f"returns {calls[0]}, not a tensor"
        if calls[0] not in self._live:
            return "has an output that the model's output does not depend on"
        return self._bypass(calls[0])

    def _bypass(self, node: fx.Node) -> str:
        """Name the path around ``node``: the first place where values from before it rejoin after it."""
        after = _closure(node, lambda n: n.users)
        for join in sorted((after - {node}) & self._live, key=self._order.__getitem__):
            sources = [p for p in join.all_input_nodes if p in self._idom and p not in after]
            if sources:
                around = " and ".join(self._describe(p) for p in sources[:2])
                return (
                    f"is bypassed by a skip connection or parallel branch: {around} "
                    f"{'reach' if len(sources) > 1 else 'reaches'} {self._describe(join)} without passing through it"
                )
        raise AssertionError(f"{node} reaches the output but neither dominates it nor is bypassed")

    def _describe(self, node: fx.Node) -> str:
        if node in self._names_at:
            return f"the output of {self._names_at[node][0]}"
        if node.op == "placeholder":
            return f"the model's input {node.target!r}"
        if node.op == "call_module":
            return f"a call of {node.target}"
        what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.name)
        stack = node.meta.get("nn_module_stack") or {}
        return f"the {what} in {next(reversed(stack.values()))[0]}" if stack else f"the {what} in the model's forward"

    def nearest(self, name: str) -> tuple[str | None, str | None]:
        """The closest cut points ``(before, after)`` module ``name`` in forward order (``None``: none).

        A module is placed at its first call, or, when the traced forward never calls it (it runs inside
        a module the tracer keeps whole), at its innermost enclosing module that is called. Of several
        modules with one output (``layer4``, ``layer4.1``) the innermost enclosing ``name`` is named,
        else the outermost.
        """
        parts = name.split(".")
        enclosing = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        for candidate in enclosing:
            first = next((c for c in self._calls.get(candidate, []) if isinstance(c, fx.Node)), None)
            if first is not None:
                break
        else:
            return None, None
        at = self._order[first]
        named = [
            (self._order[node], next((n for n in enclosing if n in self._names_at[node]), self._names_at[node][0]))
            for node in dict.fromkeys(self._outputs[n] for n in self.names)
        ]
        before = [n for position, n in named if position < at]
        after = [n for position, n in named if position >= at]
        return (before[-1] if before else None), (after[0] if after else None)

    def suggestion(self, name: str) -> str:
        """``"nearest cut points: X (before it), Y (after it)"`` (the first cut points when ``name`` has no
        place in the graph), for messages about module ``name``."""
        pairs = zip(self.nearest(name), ("before", "after"))
        found = [f"{n} ({where} it)" for n, where in pairs if n is not None]
        if found:
            return f"nearest cut points: {', '.join(found)}"
        if self.names:
            return f"cut points: {', '.join(self.names[:4])}{', ...' if len(self.names) > 4 else ''}"
        return "no module of this model is a cut point"


@dataclass
class _Entry:
    modules: tuple[tuple[str, type, int], ...]
    by_mode: dict[bool, CutPoints | str] = field(default_factory=dict)


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


def _module_key(name: str, module: nn.Module) -> tuple[Any, ...]:
    """What a cached trace depends on for one module: its name, type, identity and the forward hooks the
    trace ran through (their ops are in the graph: a hook added or removed means another graph)."""
    hooks = (module._forward_pre_hooks, module._forward_hooks)
    return name, type(module), id(module), tuple(tuple(h) for h in hooks)


def cut_points(model: nn.Module, training: bool = True) -> CutPoints:
    """The cut points of ``model`` traced in train (``training=True``: where mixing happens) or eval mode.

    Traced once per model and mode, then cached (weakly: the cache never keeps a model alive) until the
    model's set of modules, or a module's forward hooks (which the trace runs through), change. Raises
    :class:`UntraceableError` (a ``ValueError``) with the tracer's reason when torch.fx cannot trace the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(training, bool):
        raise TypeError(f"training must be True or False, got {type(training).__name__} {training!r}.")
    modules = tuple(_module_key(name, module) for name, module in model.named_modules())
    entry = _CACHE.get(model)
    if entry is None or entry.modules != modules:
        entry = _CACHE[model] = _Entry(modules)
    if training not in entry.by_mode:
        try:
            entry.by_mode[training] = CutPoints(type(model).__name__, *_trace(model, training))
        except UntraceableError as err:
            entry.by_mode[training] = err.reason
            raise
    found = entry.by_mode[training]
    if isinstance(found, str):
        raise UntraceableError(type(model).__name__, found)
    return found


def _blocks(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The names of modules with submodules (blocks, not single layers), in the given order."""
    modules = dict(model.named_modules())
    return [name for name in names if name in modules and next(modules[name].children(), None) is not None]


def _feature_info_names(model: nn.Module) -> list[str]:
    """The module names timm's ``model.feature_info`` lists ([] for models without one)."""
    return [entry["module"] for entry in getattr(model, "feature_info", None) or []]


def _shallowest_level(names: Sequence[str]) -> list[str]:
    """``names`` at the smallest number of dotted parts that holds at least two of them (else one)."""
    levels = [[n for n in names if n.count(".") == depth] for depth in sorted({n.count(".") for n in names})]
    return next((level for level in levels if len(level) >= 2), levels[0] if levels else [])


def stage_names(model: nn.Module) -> list[str]:
    """The module names of ``model``'s stage outputs, in forward order (what ``layers="stages"`` means).

    A stage is a *block* (a module with submodules) that is a cut point and does not produce the
    model's output (the classifier). Single-layer stems do not count: ResNet gives ``layer1`` ..
    ``layer4`` from torchvision and timm alike (timm's feature_info lists the stem's ``act1`` too).

    - timm models: the blocks among ``model.feature_info``'s modules (what ``features_only=True``
      returns), e.g. ``stages.0`` .. ``stages.3`` for ConvNeXt, ``blocks.0`` .. ``blocks.11`` for ViT;
    - other models: the blocks at the shallowest level of the module tree that has at least two, so
      that a single wrapper is looked into: ``features.0`` .. ``features.7`` for torchvision ConvNeXt,
      ``features.denseblock1``, ``features.transition1``, ... ``features.denseblock4`` for DenseNet.

    When torch.fx cannot trace the model, timm's names are used unchecked. Raises ``ValueError`` when
    no stage is found, or when the model can be neither traced nor has ``feature_info``.
    """
    listed = _feature_info_names(model)
    try:
        points = cut_points(model)
    except UntraceableError as err:
        if not listed:
            raise UsageError(
                f"layers='stages' needs timm's feature_info or the cut-point analysis, which is not possible: "
                f"{err} Name the layers instead (list_layers(model, example_input) lists them)."
            ) from None
        stages = _blocks(model, listed)
    else:
        blocks = [name for name in _blocks(model, points.names) if not points.produces_output(name)]
        stages = [name for name in blocks if name in listed] or _shallowest_level(blocks)
    if not stages:
        raise UsageError(
            f"layers='stages': no block (module with submodules) of {type(model).__name__} is a stage; name the "
            "layers instead (cut_points(model).names lists the cut points)."
        )
    return stages
