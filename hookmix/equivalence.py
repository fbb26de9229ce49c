"""Where mixing a layer is the same as mixing later: mixup commutes with the linear ops that follow it.

For any linear map ``W`` and offset ``c``, ``W·(λa + (1−λ)b) + c = λ(W·a + c) + (1−λ)(W·b + c)``. So when
only such ops separate a layer L from a later point P, mixing L's output with λ and partners is exactly
mixing P's: for a ResNet50 cut at ``layer4`` with its own head (average pool, flatten, ``fc``), mixing the
(B, 2048, 7, 7) map equals mixing the (B, 2048) pooled features, and equals mixing the logits.

Two chains are read from the traced train graph (:mod:`hookmix.cutpoints`), starting at L's output:

* the *fixed* chain — ops without parameters that act on each row alone and linearly: average and
  adaptive-average pooling, flatten, reshape and view that keep the batch axis, permutes that keep it
  first, means and sums over other axes, indexing that keeps every row, dropout with p = 0, identity,
  scaling or shifting by a constant. Its end is the *cheapest equivalent point*: a head-only job can
  cache the features there (2,048 values per image instead of 2,048×7×7), as long as the plan needs no
  spatial structure (CutMix does);
* the *affine* chain — the fixed chain continued through ops that are affine in their input whatever
  their (trainable) weights: ``Linear``, convolutions, scaling by a parameter. When it reaches the
  model's output, mixing L is logit mixup.

Anything else ends a chain: a nonlinearity, a normalisation (LayerNorm, BatchNorm in train mode), dropout
with p > 0 (each row gets its own mask), a value used twice, or an op whose batch axis cannot be read
from the graph. A model that cannot be traced, and a layer that is not a cut point, are *unknown*: the
analysis never claims an equivalence it has not read. The equivalence is that of mixup (a lerp); CutMix
pastes boxes of a map, which pooling does not commute with.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from hookmix._errors import UsageError
from hookmix.cutpoints import CutPoints, UntraceableError, cut_points

INPUT = "input"

__all__ = [
    "MixEquivalence",
    "SameMixPointWarning",
    "chain_end",
    "mix_equivalence",
    "same_mix_points",
    "warn_same_mix_points",
]


class SameMixPointWarning(UserWarning):
    """Two layers given to a mixer are the same mixing point for mixup (only linear ops separate them)."""


_FIXED_MODULES = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.Identity,
)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_AFFINE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOL_FUNCTIONS = {
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
}
_SCALE_FUNCTIONS = {operator.mul, operator.truediv, torch.mul, torch.div}
_SHIFT_FUNCTIONS = {operator.add, operator.sub, torch.add, torch.sub}
_SHAPE_READS = {"size", "dim"}


@dataclass(frozen=True)
class MixEquivalence:
    """Where mixing module ``layer``'s output (mixup) is the same as mixing later in the model.

    Attributes:
        layer: the module name.
        known: ``False`` when the model cannot be traced or ``layer`` is not a cut point: nothing is claimed.
        fixed_ops: the fixed linear ops after the layer, e.g. ``("avgpool", "flatten")``; caching their
            output instead of the layer's trains the same head.
        stop: what ends the fixed chain, e.g. ``"fc"`` (its input is the cheapest equivalent point), or
            ``"output"`` when only fixed ops follow the layer; ``None`` when unknown.
        same_as_output: only linear and affine ops follow the layer, so mixing it is logit mixup.
    """

    layer: str
    known: bool
    fixed_ops: tuple[str, ...] = ()
    stop: str | None = None
    same_as_output: bool = False

    def describe(self) -> str:
        """One cell of ``hookmix layers``: ``"≡ fc input, ≡ output"``, ``"≡ output"``, ``""`` (mixing here
        is its own point) or ``"?"`` (unknown)."""
        if not self.known:
            return "?"
        parts = []
        if self.fixed_ops and self.stop is None:
            parts.append(f"≡ {self.fixed_ops[-1]} output")
        elif self.fixed_ops and self.stop != "output":
            parts.append(f"≡ {self.stop} input")
        if self.same_as_output:
            parts.append("≡ output")
        return ", ".join(parts)


@dataclass(frozen=True)
class _Chains:
    fixed: tuple[fx.Node, ...]
    affine: tuple[fx.Node, ...]
    stop: fx.Node | None
    reaches_output: bool


def _flat_args(node: fx.Node) -> list[Any]:
    out: list[Any] = []
    fx.node.map_aggregate((node.args, node.kwargs), out.append)
    return out


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dims(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _positive(value: Any) -> bool:
    """Every dim in ``value`` is a literal int >= 1 (never the batch axis; negative dims are not read)."""
    dims = _dims(value)
    return bool(dims) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims)


def _is_batch_size(value: Any) -> bool:
    """``value`` is ``x.size(0)`` / ``x.shape[0]`` of some tensor (a reshape that keeps the batch axis)."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target == "size":
        return _arg(value, 1, "dim") == 0
    return value.op == "call_function" and value.target is operator.getitem and value.args[1] == 0


def _keeps_rows(node: fx.Node) -> bool:
    """Whether a parameterless call acts on each row alone (its batch axis stays axis 0, untouched)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.target in _POOL_FUNCTIONS or name == "contiguous":
        return True
    if name in ("mean", "sum"):
        return _positive(_arg(node, 1, "dim"))
    if name == "flatten":
        return _positive(_arg(node, 1, "start_dim", 0))
    if name in ("squeeze", "unsqueeze"):
        return _positive(_arg(node, 1, "dim"))
    if name == "transpose":
        return _positive([_arg(node, 1, "dim0"), _arg(node, 2, "dim1")])
    if name == "permute":
        dims = _dims(node.args[1]) if len(node.args) == 2 else list(node.args[1:])
        return bool(dims) and dims[0] == 0
    if name in ("reshape", "view"):
        shape = _dims(node.args[1]) if len(node.args) == 2 else list(node.args[1:])
        return bool(shape) and _is_batch_size(shape[0])
    if node.target is operator.getitem:
        index = node.args[1]
        first = index[0] if isinstance(index, tuple) and index else index
        return first == slice(None)
    return False


def _kind(model: nn.Module, points: CutPoints, node: fx.Node, source: fx.Node) -> str | None:
    """``"fixed"``, ``"affine"`` or ``None`` (ends both chains): how ``node`` acts on its input ``source``."""
    flat = _flat_args(node)
    others = [a for a in flat if isinstance(a, fx.Node) and a is not source]
    if flat.count(source) != 1 or any(points.depends_on_input(a) for a in others):
        return None
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        if isinstance(module, _FIXED_MODULES) or (isinstance(module, _DROPOUT_MODULES) and module.p == 0):
            return "fixed"
        if isinstance(module, nn.Flatten):
            return "fixed" if _positive(module.start_dim) else None
        return "affine" if isinstance(module, _AFFINE_MODULES) else None
    if node.op not in ("call_function", "call_method"):
        return None
    if node.target in _SCALE_FUNCTIONS or node.target in _SHIFT_FUNCTIONS:
        if node.target in (operator.truediv, torch.div) and node.args[0] is not source:
            return None  # c / x is not linear in x
        return "affine" if others else "fixed"
    if node.target is F.linear:
        return "affine"
    return "fixed" if _keeps_rows(node) else None


def _data_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (not only its shape)."""
    return [
        user
        for user in node.users
        if not (user.op == "call_method" and user.target in _SHAPE_READS)
        and not (user.op == "call_function" and user.target is getattr)
    ]


def _chains(model: nn.Module, points: CutPoints, start: fx.Node) -> _Chains:
    """Walk from ``start`` through the fixed ops, then the affine ones, to the first other op."""
    fixed: list[fx.Node] = []
    affine: list[fx.Node] = []
    node = start
    while True:
        users = _data_users(node)
        if len(users) != 1:
            return _Chains(tuple(fixed), tuple(affine), None, False)
        user = users[0]
        if user.op == "output":
            return _Chains(tuple(fixed), tuple(affine), user, True)
        kind = _kind(model, points, user, node)
        if kind is None:
            return _Chains(tuple(fixed), tuple(affine), user, False)
        (fixed if kind == "fixed" and not affine else affine).append(user)
        node = user


def _name(points: CutPoints, node: fx.Node) -> str:
    """A node as ``hookmix layers`` names it: its module, or the op and the module it runs in."""
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        return str(node.target)
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.name)
    stack = node.meta.get("nn_module_stack") or {}
    return f"{what} in {next(reversed(stack.values()))[0]}" if stack else str(what)


def _module(points: CutPoints, node: fx.Node) -> str:
    """The module an op runs in (``"head.norm"`` for the layer_norm inside it), for "≡ X input"."""
    stack = node.meta.get("nn_module_stack") or {}
    if node.op in ("call_function", "call_method") and stack:
        return str(next(reversed(stack.values()))[0])
    return _name(points, node)


def _start(points: CutPoints, layer: str) -> fx.Node | None:
    """The node holding ``layer``'s output, or the single input for ``"input"``; ``None``: not a cut point."""
    if layer == INPUT:
        inputs = [node for node in points.graph.nodes if node.op == "placeholder"]
        return inputs[0] if len(inputs) == 1 else None
    return points.node(layer) if points.why_not(layer) is None else None


def _analysis(model: nn.Module, layer: str, training: bool) -> tuple[CutPoints, _Chains] | None:
    try:
        points = cut_points(model, training=training)
    except UntraceableError:
        return None
    start = _start(points, layer)
    return None if start is None else (points, _chains(model, points, start))


def mix_equivalence(model: nn.Module, layer: str) -> MixEquivalence:
    """Where mixing ``layer``'s output (or ``"input"``: the model's single input, e.g. a head's features) is
    the same as mixing later in ``model`` (read from its train graph).

    ``mix_equivalence(resnet50, "layer4")`` gives ``fixed_ops=("avgpool", "flatten")``, ``stop="fc"`` and
    ``same_as_output=True``; a ViT block, followed by a LayerNorm, gives no equivalent point. Unknown
    (``known=False``) when torch.fx cannot trace the model or ``layer`` is not a cut point.
    """
    found = _analysis(model, layer, True)
    if found is None:
        return MixEquivalence(layer, known=False)
    points, chains = found
    return MixEquivalence(
        layer,
        known=True,
        fixed_ops=tuple(_name(points, n) for n in chains.fixed),
        stop=None if chains.stop is None else _module(points, chains.affine[0] if chains.affine else chains.stop),
        same_as_output=chains.reaches_output,
    )


def chain_end(model: nn.Module, layer: str, training: bool) -> fx.Node:
    """The node of ``model``'s graph in the given mode where the fixed chain after cut point ``layer`` (or
    ``"input"``) ends: the cheapest point equivalent to ``layer`` for mixup (``layer``'s own output when no
    fixed op follows).

    Only the ops the train and the eval graph share count, so a backbone cut there returns the same
    tensor in both modes.
    """
    found, other = (_analysis(model, layer, mode) for mode in (training, not training))
    if found is None:
        raise UsageError(f"layer={layer!r} is not a cut point of {type(model).__name__}; nothing to cut past.")
    points, chains = found
    own, theirs = chains.fixed, other[1].fixed if other is not None else ()
    shared = 0
    while shared < min(len(own), len(theirs)) and _same_op(own[shared], theirs[shared]):
        shared += 1
    return own[shared - 1] if shared else _start(points, layer)


def _same_op(a: fx.Node, b: fx.Node) -> bool:
    return (a.op, a.target) == (b.op, b.target)


def same_mix_points(model: nn.Module, layers: Sequence[str]) -> list[tuple[str, str]]:
    """The pairs ``(earlier, later)`` of ``layers`` that are the same mixing point for mixup: only linear
    ops separate them (``"output"``: the model's output). Layers that cannot be analysed pair with none."""
    nodes: dict[str, fx.Node] = {}
    pairs = []
    try:
        points = cut_points(model, training=True)
    except UntraceableError:
        return []
    for name in layers:
        if name not in (INPUT, "output") and (node := _start(points, name)) is not None:
            nodes[name] = node
    for name, node in nodes.items():
        chains = _chains(model, points, node)
        reached = {*chains.fixed, *chains.affine}
        for other in layers:
            if other == "output" and chains.reaches_output:
                pairs.append((name, other))
            elif other in nodes and other != name and nodes[other] in reached:
                pairs.append((name, other))
    return pairs


def warn_same_mix_points(model: nn.Module, layers: Sequence[str], *, stacklevel: int) -> None:
    """One :class:`SameMixPointWarning` naming every pair of ``layers`` that is the same mixing point."""
    pairs = same_mix_points(model, layers)
    if pairs:
        named = "; ".join(f"{a!r} ≡ {b!r}" for a, b in pairs)
        warnings.warn(
            f"layers {named}: only linear ops separate them, so mixup at one is exactly mixup at the other "
            "(W·(λa+(1−λ)b)+c = λ(W·a+c)+(1−λ)(W·b+c)); as separate arms they are one experiment. Keep one of "
            "each pair (CutMix, which pastes boxes of a map, does differ).",
            SameMixPointWarning,
            stacklevel=stacklevel + 1,
        )
