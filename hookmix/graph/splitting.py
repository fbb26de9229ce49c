"""Cut a model at a named layer into ``(backbone, head)`` for head-only fine-tuning on cached features.

``head(backbone(x))`` computes ``model(x)``: the backbone maps the model's input to the layer's output
(e.g. ``(B, 2048, 7, 7)`` for torchvision resnet50 ``layer4``, ``(B, N, D)`` tokens for a timm ViT
block) and the head maps that output to the model's output. Both are built by torch.fx graph surgery on
the graph :mod:`hookmix.graph.cutpoints` traced, so they share the model's own submodules and Parameter
objects: a model loaded with pretrained weights gives a head with those weights, and training the head
trains them. Only a cut point (a module every path from input to output passes through) can be cut at.

Python branches on ``self.training`` are frozen into a traced graph, so the model is cut in its train
graph and in its eval graph; like torchvision's ``create_feature_extractor``, each half is a
``DualGraphModule`` that switches graphs on ``.train()`` / ``.eval()``.
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import fx, nn
from torchvision.models.feature_extraction import DualGraphModule

from hookmix.core.checks import modes_restored
from hookmix.core.errors import UsageError
from hookmix.graph.cutpoints import CutPoints, UntraceableError, cut_points
from hookmix.graph.equivalence import chain_end
from hookmix.graph.layers import INPUT, PSEUDO_LAYERS, module_names, unknown_layer_error

__all__ = ["split"]


def _constants_read_after(points: CutPoints, cut: fx.Node) -> list[fx.Node]:
    """Nodes before ``cut`` not computed from the input that nodes after it read, with their sources.

    These (parameters and what is computed from them alone) are copied into the head.
    """
    nodes = list(points.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    pending = [
        src
        for node in nodes[position[cut] + 1 :]
        for src in node.all_input_nodes
        if position[src] < position[cut] and not points.depends_on_input(src)
    ]
    constants: set[fx.Node] = set()
    while pending:
        node = pending.pop()
        if node not in constants:
            constants.add(node)
            pending.extend(node.all_input_nodes)
    return sorted(constants, key=position.__getitem__)


def _copy_nodes(nodes: Iterable[fx.Node], env: dict[fx.Node, fx.Node], graph: fx.Graph) -> None:
    for node in nodes:
        env[node] = graph.node_copy(node, env.__getitem__)


def _backbone_graph(points: CutPoints, cut: fx.Node) -> fx.Graph:
    """Every node up to ``cut`` (dead ones too: they may be in-place ops), returning ``cut``."""
    nodes = list(points.graph.nodes)
    backbone = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    _copy_nodes(nodes[: nodes.index(cut) + 1], env, backbone)
    backbone.output(env[cut])
    return backbone


def _head_graph(points: CutPoints, cut: fx.Node) -> fx.Graph:
    """A ``features`` placeholder standing for ``cut``, the constants read after it, then the later nodes.

    Later nodes that read values from before ``cut`` other than constants are left out: ``cut`` being a
    cut point, they feed nothing the output depends on (e.g. a shape assertion on the input).
    """
    nodes = list(points.graph.nodes)
    head = fx.Graph()
    env = {cut: head.placeholder("features")}
    _copy_nodes(_constants_read_after(points, cut), env, head)
    for node in nodes[nodes.index(cut) + 1 :]:
        if all(src in env for src in node.all_input_nodes):
            env[node] = head.node_copy(node, env.__getitem__)
    return head


def _graph_module(
    model: nn.Module,
    cuts: dict[bool, tuple[CutPoints, fx.Node]],
    cut_graph: Callable[[CutPoints, fx.Node], fx.Graph],
    role: str,
    training: bool,
) -> DualGraphModule:
    train_graph, eval_graph = (cut_graph(*cuts[mode]) for mode in (True, False))
    module = DualGraphModule(model, train_graph, eval_graph, class_name=f"{type(model).__name__}{role}")
    return module.train(training)


def split(model: nn.Module, layer: str, *, past_fixed_ops: bool = False) -> tuple[nn.Module, nn.Module]:
    """Cut ``model`` after module ``layer`` into ``(backbone, head)`` with ``head(backbone(x)) == model(x)``.

    The backbone takes the model's inputs and returns the layer's output (e.g. ``(B, C, H, W)`` for a CNN
    stage, ``(B, N, D)`` tokens for a ViT block); the head takes that tensor and returns the model's
    output. Both hold the model's own submodules and Parameter objects (no copies), so they are on the
    model's device and dtype, in its train/eval mode, and ``.train()`` / ``.eval()`` on them behave as on
    the model. Typical use: run the backbone once over a dataset to cache features, then train the head.

    ``past_fixed_ops=True`` moves the cut past the fixed linear ops that follow ``layer`` (average pooling,
    flatten, ...; :func:`hookmix.mix_equivalence` lists them): for a ResNet50 at ``layer4`` the
    backbone then returns the pooled (B, 2048) features and the head is ``fc``. Mixup of that backbone's
    output trains the head exactly as mixup of ``layer4``'s would, from a 49× smaller cache. With
    ``layer="input"`` it splits a head into the fixed ops at its input and the rest: ``prefix(features)``
    is what to cache, ``rest`` what to train.

    Raises ``ValueError`` when ``layer`` is not a module of ``model`` (listing close names), is a
    pseudo-layer (``"input"``/``"output"``), is not a cut point (inside a residual block, called several
    times; the message names the bypassing path and the nearest cut points before and after it), or
    when torch.fx cannot trace ``model`` (the message gives the tracer's reason).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a module name such as 'layer4', got {type(layer).__name__} {layer!r}.")
    names = module_names(model)
    cut_input = layer == INPUT and past_fixed_ops
    if layer in PSEUDO_LAYERS and not cut_input:
        top = [name for name in names if "." not in name]
        raise UsageError(
            f"layer={layer!r} is a pseudo-layer, not a cut point: the backbone or the head would be the "
            f"whole model. Name a module to cut after; top-level modules are: {', '.join(top[:8])}."
        )
    if layer not in names and not cut_input:
        raise unknown_layer_error("layer", layer, names)
    cuts: dict[bool, tuple[CutPoints, fx.Node]] = {}
    for mode in (False, True):
        try:
            points = cut_points(model, training=mode)
        except UntraceableError as err:
            raise UsageError(
                f"split() {err} Split the model by hand into two modules, a backbone (input -> layer output) "
                "and a head (layer output -> model output), and pass those to the cache / head trainer directly."
            ) from err
        reason = None if cut_input else points.why_not(layer)
        if reason is not None:
            in_mode = " in train mode" if mode else ""
            raise UsageError(
                f"layer={layer!r} cannot split {type(model).__name__}{in_mode}: it {reason}; "
                f"{points.suggestion(layer)}."
            )
        cuts[mode] = points, chain_end(model, layer, mode) if past_fixed_ops else points.node(layer)
    return _split_at(model, cuts)


def _split_at(model: nn.Module, cuts: dict[bool, tuple[CutPoints, fx.Node]]) -> tuple[nn.Module, nn.Module]:
    training = model.training
    with modes_restored(model):
        backbone = _graph_module(model, cuts, _backbone_graph, "Backbone", training)
        head = _graph_module(model, cuts, _head_graph, "Head", training)
    return backbone, head
