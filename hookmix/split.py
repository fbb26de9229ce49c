"""Cut a model at a named layer into ``(backbone, head)`` for head-only fine-tuning on cached features.

``head(backbone(x))`` computes ``model(x)``: the backbone maps the model's input to the layer's output
(e.g. ``(B, 2048, 7, 7)`` for torchvision resnet50 ``layer4``, ``(B, N, D)`` tokens for a timm ViT
block) and the head maps that output to the model's output. Both are built by torch.fx graph surgery on
one traced graph, so they share the model's own submodules and Parameter objects: a model loaded with
pretrained weights gives a head with those weights, and training the head trains them.

The model is traced once in train mode and once in eval mode, because Python branches on
``self.training`` are frozen into a traced graph; like torchvision's ``create_feature_extractor``,
each half is a ``DualGraphModule`` that switches graphs on ``.train()`` / ``.eval()``. Modules the
tracer keeps whole are those torchvision's and timm's feature extractors keep whole.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import timm.layers
import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import DualGraphModule

from hookmix.layers import PSEUDO_LAYERS, module_names, unknown_layer_error

__all__ = ["split"]

_TORCHVISION_OPS = tuple(
    obj for obj in vars(torchvision.ops).values() if isinstance(obj, type) and issubclass(obj, nn.Module)
)
_SUGGESTIONS = 3


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


@contextmanager
def _modes_restored(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own ``training`` flag on exit (``.train()`` would overwrite mixed modes)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _default_arguments(model: nn.Module) -> dict[str, Any]:
    """``forward``'s arguments after the input that have defaults (e.g. timm ViT's ``attn_mask=None``).

    Tracing fixes them to their defaults; left symbolic, every block would read them from the model's
    input side and no block could be a cut point.
    """
    parameters = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def _trace(model: nn.Module, training: bool) -> tuple[fx.Graph, dict[str, list[Any]]]:
    tracer = _CutTracer()
    model.train(training)
    try:
        graph = tracer.trace(model, concrete_args=_default_arguments(model))
    except Exception as err:  # the tracer fails with whatever the model's forward raises on a Proxy
        lines = str(err).strip().splitlines()
        reason = f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
        raise ValueError(
            f"split() cannot trace {type(model).__name__} with torch.fx ({reason}). This usually means "
            "Python control flow on tensor values (e.g. `if x.sum() > 0:`) in forward. Split the model by "
            "hand into two modules, a backbone (input -> layer output) and a head (layer output -> model "
            "output), and pass those to the cache / head trainer directly."
        ) from err
    return graph, tracer.outputs


def _module_output(outputs: dict[str, list[Any]], name: str) -> fx.Node | str:
    """The graph node holding module ``name``'s output, or why there is no single such node."""
    calls = outputs.get(name, [])
    if not calls:
        return (
            "is not reached by the traced forward (forward never calls it, or it runs inside a module the "
            "tracer keeps whole)"
        )
    if len(calls) > 1:
        return f"is called {len(calls)} times by forward, so its output is not one point of the network"
    if not isinstance(calls[0], fx.Proxy):
        return f"returns {type(calls[0]).__name__}, not a tensor"
    return calls[0].node


def _pre_cut_sources(graph: fx.Graph, cut: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """Nodes before ``cut`` that nodes after it read, other than ``cut``: ``(constants, bypasses)``.

    Constants (parameters and what is computed from them alone) are copied into the head, together with
    the constants they are computed from; bypasses depend on the model's input and make ``cut`` invalid.
    """
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    depends_on_input: set[fx.Node] = set()
    for node in nodes:
        if node.op == "placeholder" or any(src in depends_on_input for src in node.all_input_nodes):
            depends_on_input.add(node)
    pending = [
        src
        for node in nodes[position[cut] + 1 :]
        for src in node.all_input_nodes
        if src is not cut and position[src] < position[cut]
    ]
    constants: set[fx.Node] = set()
    bypasses: set[fx.Node] = set()
    while pending:
        node = pending.pop()
        if node in depends_on_input:
            bypasses.add(node)
        elif node not in constants:
            constants.add(node)
            pending.extend(node.all_input_nodes)
    return sorted(constants, key=position.__getitem__), sorted(bypasses, key=position.__getitem__)


def _locate_cut(graph: fx.Graph, outputs: dict[str, list[Any]], name: str) -> fx.Node | str:
    """The node to cut ``graph`` at for module ``name``, or why ``name`` is not a valid cut point."""
    cut = _module_output(outputs, name)
    if isinstance(cut, fx.Node) and _pre_cut_sources(graph, cut)[1]:
        return (
            "has an output that does not carry everything the rest of the network needs (a skip "
            "connection bypasses it, e.g. it sits inside a residual block)"
        )
    return cut


def _valid_cuts_near(graph: fx.Graph, outputs: dict[str, list[Any]], layer: str) -> list[str]:
    """Valid cut points near ``layer``: enclosing modules (innermost first), then the closest in the graph."""
    parts = layer.split(".")
    ancestors = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    position = {node: i for i, node in enumerate(graph.nodes)}
    located = [_module_output(outputs, name) for name in (layer, *ancestors)]
    anchor = next((position[node] for node in located if isinstance(node, fx.Node)), 0)

    def rank(name: str) -> tuple[int, int]:
        if name in ancestors:
            return 0, ancestors.index(name)
        node = _module_output(outputs, name)
        return 1, abs(position[node] - anchor) if isinstance(node, fx.Node) else len(position)

    valid = [n for n in outputs if n != layer and isinstance(_locate_cut(graph, outputs, n), fx.Node)]
    return sorted(valid, key=rank)[:_SUGGESTIONS]


def _copy_nodes(nodes: Iterable[fx.Node], env: dict[fx.Node, fx.Node], graph: fx.Graph) -> None:
    for node in nodes:
        env[node] = graph.node_copy(node, env.__getitem__)


def _backbone_graph(graph: fx.Graph, cut: fx.Node) -> fx.Graph:
    """Every node up to ``cut`` (dead ones too: they may be in-place ops), returning ``cut``."""
    nodes = list(graph.nodes)
    backbone = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    _copy_nodes(nodes[: nodes.index(cut) + 1], env, backbone)
    backbone.output(env[cut])
    return backbone


def _head_graph(graph: fx.Graph, cut: fx.Node) -> fx.Graph:
    """A ``features`` placeholder standing for ``cut``, the constants read after it, then every later node."""
    nodes = list(graph.nodes)
    head = fx.Graph()
    env = {cut: head.placeholder("features")}
    constants, _ = _pre_cut_sources(graph, cut)
    _copy_nodes([*constants, *nodes[nodes.index(cut) + 1 :]], env, head)
    return head


def _graph_module(
    model: nn.Module,
    graphs: dict[bool, tuple[fx.Graph, fx.Node]],
    cut_graph: Callable[[fx.Graph, fx.Node], fx.Graph],
    role: str,
    training: bool,
) -> DualGraphModule:
    train_graph, eval_graph = (cut_graph(*graphs[mode]) for mode in (True, False))
    module = DualGraphModule(model, train_graph, eval_graph, class_name=f"{type(model).__name__}{role}")
    return module.train(training)


def split(model: nn.Module, layer: str) -> tuple[nn.Module, nn.Module]:
    """Cut ``model`` after module ``layer`` into ``(backbone, head)`` with ``head(backbone(x)) == model(x)``.

    The backbone takes the model's inputs and returns the layer's output (e.g. ``(B, C, H, W)`` for a CNN
    stage, ``(B, N, D)`` tokens for a ViT block); the head takes that tensor and returns the model's
    output. Both hold the model's own submodules and Parameter objects (no copies), so they are on the
    model's device and dtype, in its train/eval mode, and ``.train()`` / ``.eval()`` on them behave as on
    the model. Typical use: run the backbone once over a dataset to cache features, then train the head.

    Raises ``ValueError`` when ``layer`` is not a module of ``model`` (listing close names), is a
    pseudo-layer (``"input"``/``"output"``), is not a single point of the network (inside a residual
    block, called several times; the message lists valid cut points nearby), or when torch.fx cannot
    trace ``model`` (the message gives the tracer's reason).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(layer, str):
        raise TypeError(
            f"layer must be a module name such as 'layer4', got {type(layer).__name__} {layer!r}."
        )
    names = module_names(model)
    if layer in PSEUDO_LAYERS:
        top = [name for name in names if "." not in name]
        raise ValueError(
            f"layer={layer!r} is a pseudo-layer, not a cut point: the backbone or the head would be the "
            f"whole model. Name a module to cut after; top-level modules are: {', '.join(top[:8])}."
        )
    if layer not in names:
        raise unknown_layer_error("layer", layer, names)
    training = model.training
    with _modes_restored(model):
        graphs: dict[bool, tuple[fx.Graph, fx.Node]] = {}
        for mode in (False, True):
            graph, outputs = _trace(model, mode)
            cut = _locate_cut(graph, outputs, layer)
            if isinstance(cut, str):
                near = _valid_cuts_near(graph, outputs, layer)
                hint = f"valid cut points nearby: {', '.join(near)}" if near else "no module is a cut point"
                in_mode = " in train mode" if mode else ""
                raise ValueError(
                    f"layer={layer!r} cannot split {type(model).__name__}{in_mode}: it {cut}; {hint}."
                )
            graphs[mode] = graph, cut
        backbone = _graph_module(model, graphs, _backbone_graph, "Backbone", training)
        head = _graph_module(model, graphs, _head_graph, "Head", training)
    return backbone, head
