"""Which axis of a layer's output holds the channels: the layout CutMix needs to paste whole positions.

Mixup interpolates every element and needs no layout. CutMix pastes positions of the partner, all their
channels at once, so it must know which axes are positions: ``"NCHW"`` from convolutions, ``"NHWC"`` from
timm's and torchvision's Swin stages, ``"NLC"`` tokens (ViT blocks), ``"NCL"`` from ``Conv1d``. A layout is
a fact taken from the model, never guessed from the shape:

1. an explicit ``layout=`` argument of :class:`~hookmix.HookMixer`;
2. the traced graph (:mod:`hookmix.graph.cutpoints`): the op that produces the layer's output is followed back
   through ops that keep the layout (activations, dropout, residual additions, concatenation) to one that
   fixes where the channels are: a convolution, batch / group / instance norm or pooling puts them on
   axis 1, a linear layer or a last-axis layer norm on the last axis, and ``permute`` / ``transpose``
   move them. Where nothing before says, the ops that read the output do (a convolution reading it
   reads channels on axis 1), e.g. for the model's input;
3. timm's ``output_fmt`` attribute on the layer or its nearest enclosing module (``"NHWC"`` on Swin).

Otherwise the layout is unknown and CutMix refuses that layer, naming the argument. ``channels_last``
memory format is not a layout: it changes strides, not which logical axis holds the channels.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from hookmix.core.errors import UsageError
from hookmix.graph.cutpoints import CutPoints, UntraceableError, cut_points
from hookmix.graph.layers import INPUT, OUTPUT

__all__ = ["LAYOUTS", "LayerLayouts", "check_layout", "channel_axes", "layout_of"]

LAYOUTS = ("NCHW", "NHWC", "NCL", "NLC")
"""Batch-first layouts CutMix knows: 2-D maps channels first / last, 1-D signals, token sequences."""

_FIRST = 1
_LAST = -1

_CHANNELS_FIRST_MODULES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_CHANNELS_LAST_MODULES: tuple[type, ...] = (nn.Linear,)
_ELEMENTWISE_MODULES: tuple[type, ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.ELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.PReLU,
    nn.modules.dropout._DropoutNd,
)
_CHANNELS_FIRST_FUNCTIONS = {
    F.conv1d,
    F.conv2d,
    F.conv3d,
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    F.batch_norm,
    F.instance_norm,
    F.group_norm,
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
}
_CHANNELS_LAST_FUNCTIONS = {F.linear}
_ELEMENTWISE_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.imul,
    torch.add,
    torch.sub,
    torch.mul,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.cat,
    F.relu,
    F.gelu,
    F.silu,
    F.sigmoid,
    F.hardswish,
    F.dropout,
    F.relu6,
    F.leaky_relu,
    F.mish,
}
_ELEMENTWISE_METHODS = {
    "add",
    "add_",
    "sub",
    "mul",
    "mul_",
    "div",
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "contiguous",
    "clone",
    "float",
    "half",
    "bfloat16",
    "to",
    "type_as",
}


def check_layout(layout: Any, layers: Sequence[str]) -> dict[str, str]:
    """Validate ``layout=``: ``None``, one of :data:`LAYOUTS` for every layer, or ``{layer: layout}``.

    Returns the layout given for each named layer (missing layers are inferred later).
    """
    if layout is None:
        return {}
    if isinstance(layout, str):
        given = {name: layout for name in layers}
    elif isinstance(layout, Mapping):
        unknown = sorted(set(layout) - set(layers))
        if unknown:
            raise UsageError(
                f"layout names {unknown}, which are not among the mixed layers {list(layers)}; key it by those names."
            )
        given = dict(layout)
    else:
        raise TypeError(
            f"layout must be a string such as 'NHWC' or a dict {{layer: layout}}, got {type(layout).__name__}."
        )
    bad = {name: value for name, value in given.items() if value not in LAYOUTS}
    if bad:
        raise UsageError(f"layout {bad!r} is not one of {LAYOUTS}; e.g. layout='NHWC' for timm Swin stages.")
    return given


def _normalised(axis: int, rank: int) -> int | None:
    axis = axis + rank if axis < 0 else axis
    return axis if 0 <= axis < rank else None


def _permuted(axis: int, dims: Sequence[Any]) -> int | None:
    """Where channel ``axis`` goes under ``permute(dims)``."""
    if not all(isinstance(d, int) for d in dims):
        return None
    rank = len(dims)
    source = _normalised(axis, rank)
    normalised = [d % rank for d in dims]
    return normalised.index(source) if source in normalised else None


def _transposed(axis: int, first: Any, second: Any) -> int | None:
    """Where channel ``axis`` goes under ``transpose(first, second)`` (unknown when signs do not compare)."""
    if not (isinstance(first, int) and isinstance(second, int)):
        return None
    if len({axis < 0, first < 0, second < 0}) > 1:
        return None
    return second if axis == first else first if axis == second else axis


class _Reader:
    """Channel axes of the nodes of one traced model, worked out on demand and remembered."""

    def __init__(self, model: nn.Module, points: CutPoints) -> None:
        self._modules = dict(model.named_modules())
        self._points = points
        self._known: dict[fx.Node, int | None] = {}

    def _from_input(self, node: fx.Node) -> list[fx.Node]:
        return [arg for arg in node.all_input_nodes if self._points.depends_on_input(arg)]

    def _agreed(self, nodes: Sequence[fx.Node]) -> int | None:
        axes = {self.axis(n) for n in nodes} - {None}
        return axes.pop() if len(axes) == 1 else None

    def axis(self, node: fx.Node) -> int | None:
        """The channel axis of ``node``'s value (negative counts from the end), ``None`` when unknown: from
        the op that produced it, else from the ops that read it."""
        if node not in self._known:
            self._known[node] = None  # a cycle cannot occur in an fx graph; this guards re-entry on errors
            found = self._produced(node)
            self._known[node] = found if found is not None else self._consumed(node)
        return self._known[node]

    def _inputs_axis(self, node: fx.Node) -> int | None:
        return self._agreed(self._from_input(node))

    def _produced(self, node: fx.Node) -> int | None:
        if node.op == "call_module":
            return _module_effect(self._modules.get(str(node.target)), lambda: self._inputs_axis(node))
        if node.op not in ("call_function", "call_method"):
            return None
        target = node.target
        if target in _CHANNELS_FIRST_FUNCTIONS:
            return _FIRST
        if target in _CHANNELS_LAST_FUNCTIONS or _is_last_axis_norm_call(node):
            return _LAST
        if target in (torch.permute, "permute"):
            return self._moved(node, lambda axis: _permuted(axis, _dims(node.args[1:])))
        if target in (torch.transpose, torch.swapaxes, "transpose", "swapaxes"):
            return self._moved(node, lambda axis: _transposed(axis, *node.args[1:3]))
        if target in (torch.flatten, "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            return self._moved(node, lambda axis: _flattened(axis, start))
        if target in _ELEMENTWISE_FUNCTIONS or target in _ELEMENTWISE_METHODS:
            return self._inputs_axis(node)
        return None

    def _moved(self, node: fx.Node, move: Callable[[int], int | None]) -> int | None:
        source = node.args[0]
        return _then(self.axis(source) if isinstance(source, fx.Node) else None, move)

    def _consumed(self, node: fx.Node) -> int | None:
        """The channel axis that the first layout-fixing readers of ``node`` expect (through elementwise ops)."""
        axes: set[int] = set()
        frontier, seen = list(node.users), set()
        while frontier:
            user = frontier.pop()
            if user in seen:
                continue
            seen.add(user)
            module = self._modules.get(str(user.target)) if user.op == "call_module" else None
            if user.op == "call_module" and isinstance(module, nn.Sequential):
                module = next(iter(module), None)  # what reads the input is the first module of the sequence
            if isinstance(module, _CHANNELS_FIRST_MODULES) or user.target in _CHANNELS_FIRST_FUNCTIONS:
                axes.add(_FIRST)
            elif (
                isinstance(module, _CHANNELS_LAST_MODULES)
                or _is_last_axis_norm(module)
                or user.target in _CHANNELS_LAST_FUNCTIONS
                or _is_last_axis_norm_call(user)
            ):
                axes.add(_LAST)
            elif _keeps_layout(module) or user.target in _ELEMENTWISE_FUNCTIONS or user.target in _ELEMENTWISE_METHODS:
                frontier.extend(user.users)
        return axes.pop() if len(axes) == 1 else None


def _flattened(axis: int, start: Any) -> int | None:
    """Where channel ``axis`` goes under ``flatten(start)``: kept when it lies before the merged axes."""
    return axis if isinstance(start, int) and 0 <= axis < start else None


def _keeps_layout(module: nn.Module | None) -> bool:
    """Elementwise modules: activations, dropout, identity, stochastic depth (per-row scaling)."""
    return isinstance(module, _ELEMENTWISE_MODULES) or (
        module is not None and type(module).__name__ in ("DropPath", "StochasticDepth")
    )


def _module_effect(module: nn.Module | None, axis_in: Callable[[], int | None]) -> int | None:
    """The channel axis after ``module`` (a module the tracer keeps whole), given its input's ``axis_in()``."""
    if isinstance(module, _CHANNELS_FIRST_MODULES):
        return _FIRST
    if isinstance(module, _CHANNELS_LAST_MODULES) or _is_last_axis_norm(module):
        return _LAST
    if _keeps_layout(module):
        return axis_in()
    if isinstance(module, nn.Flatten):
        return _then(axis_in(), lambda axis: _flattened(axis, module.start_dim))
    dims = getattr(module, "dims", None)
    if type(module).__name__ == "Permute" and isinstance(dims, (list, tuple)):  # torchvision.ops.misc.Permute
        return _then(axis_in(), lambda axis: _permuted(axis, dims))
    if isinstance(module, nn.Sequential):  # torchvision's Conv2dNormActivation and the like
        axis: Callable[[], int | None] = axis_in
        for child in module:
            axis = functools.partial(_module_effect, child, axis)
        return axis()
    return None


def _then(axis: int | None, move: Callable[[int], int | None]) -> int | None:
    return None if axis is None else move(axis)


def _dims(args: Sequence[Any]) -> Sequence[Any]:
    """``permute``'s dims, given as one sequence or as separate arguments."""
    return args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args


def _is_last_axis_norm(module: nn.Module | None) -> bool:
    """torch's own LayerNorm / RMSNorm over one trailing axis (subclasses such as timm's LayerNorm2d permute)."""
    norms = tuple(cls for cls in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if cls is not None)
    return (
        isinstance(module, norms) and type(module).__module__.startswith("torch.") and len(module.normalized_shape) == 1
    )


def _is_last_axis_norm_call(node: fx.Node) -> bool:
    norms = {F.layer_norm, getattr(F, "rms_norm", F.layer_norm)}
    if node.op != "call_function" or node.target not in norms or len(node.args) < 2:
        return False
    shape = node.args[1]
    return isinstance(shape, (tuple, list)) and len(shape) == 1


def _node_of(points: CutPoints, name: str) -> fx.Node | None:
    if name == INPUT:
        return next((n for n in points.graph.nodes if n.op == "placeholder"), None)
    if name == OUTPUT:
        out = next(n for n in points.graph.nodes if n.op == "output")
        result = out.args[0]
        return result if isinstance(result, fx.Node) else None
    try:
        return points.node(name)
    except KeyError:
        return None


def _declared(model: nn.Module, name: str) -> int | None:
    """The channel axis from timm's ``output_fmt`` on the layer or its nearest enclosing module."""
    modules = dict(model.named_modules())
    parts = [] if name in (INPUT, OUTPUT) else name.split(".")
    for depth in range(len(parts), -1, -1):
        module = modules.get(".".join(parts[:depth]))
        if getattr(module, "flatten", False) is True:  # timm's PatchEmbed: output_fmt 'NCHW', output flattened
            continue
        fmt = getattr(module, "output_fmt", None)
        fmt = str(getattr(fmt, "value", fmt)) if fmt is not None else None
        if fmt in LAYOUTS:
            return _FIRST if fmt in ("NCHW", "NCL") else _LAST
    return None


def channel_axes(model: nn.Module, layers: Sequence[str]) -> dict[str, int | None]:
    """The channel axis of each layer's output as the model states it (see the module docstring):
    1 (channels first), -1 (last), another axis after a permute, or ``None`` when unknown."""
    try:
        points: CutPoints | None = cut_points(model, training=True)
    except UntraceableError:
        points = None
    reader = _Reader(model, points) if points is not None else None
    found: dict[str, int | None] = {}
    for name in layers:
        node = _node_of(points, name) if points is not None else None
        axis = reader.axis(node) if reader is not None and node is not None else None
        found[name] = axis if axis is not None else _declared(model, name)
    return found


def layout_of(axis: int | None, rank: int) -> str | None:
    """The layout of a batch-first tensor of ``rank`` dims whose channels are on ``axis`` (``None``: unknown)."""
    if axis is None:
        return None
    at = _normalised(axis, rank)
    return {(4, 1): "NCHW", (4, 3): "NHWC", (3, 1): "NCL", (3, 2): "NLC"}.get((rank, at))


class LayerLayouts:
    """The layout CutMix uses for each leaf of each mixed layer's output: the one given, else the model's.

    Args:
        model: the hooked model (its traced graph or timm's ``output_fmt`` says where the channels are).
        layers: the mixed layers.
        layout: ``layout=`` as given to :class:`~hookmix.HookMixer` (see :func:`check_layout`).
        cutmix: whether CutMix is on; without it the model is not read (mixup needs no layout).
        batch_dim: the batch dimension of the outputs; 1 means sequence-first ``(L, N, C)`` tokens.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], layout: Any, *, cutmix: bool, batch_dim: int) -> None:
        self._given = check_layout(layout, layers)
        self._axes = channel_axes(model, [n for n in layers if n not in self._given]) if cutmix else {}
        self._batch_dim, self._model_name = batch_dim, type(model).__name__

    def of(self, name: str, t: torch.Tensor) -> str | None:
        """The layout of ``t``, a leaf of layer ``name``'s output (``None``: interpolate it, no box); refuses
        a 3-D or 4-D leaf whose layout is neither given nor known from the model."""
        if self._batch_dim != 0:
            return "LNC" if self._batch_dim == 1 and t.dim() == 3 else None
        if t.dim() not in (3, 4):
            return None
        given = self._given.get(name)
        if given is not None:
            if len(given) != t.dim():
                raise UsageError(
                    f"layout={given!r} was given for layer {name!r}, but it produced a {t.dim()}-D tensor "
                    f"{tuple(t.shape)}; give a {t.dim()}-letter layout "
                    f"({', '.join(repr(x) for x in LAYOUTS if len(x) == t.dim())})."
                )
            return given
        found = layout_of(self._axes.get(name), t.dim())
        if found is None:
            raise UsageError(
                f"cutmix at layer {name!r} needs to know which axes of its output {tuple(t.shape)} are positions and "
                f"which are channels, and {self._model_name} does not say (hookmix reads it from the traced "
                f"graph or timm's output_fmt). Pass layout={{{name!r}: 'NCHW'}} (or 'NHWC', 'NCL', 'NLC' for tokens) "
                "to HookMixer, or use mixup at this layer (cutmix_alpha=0)."
            )
        return found
