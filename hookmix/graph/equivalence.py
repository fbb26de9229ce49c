"""Where mixing a layer is the same as mixing later: mixup commutes with the linear ops that follow it.

For any linear map ``W`` and offset ``c``, ``W·(λa + (1−λ)b) + c = λ(W·a + c) + (1−λ)(W·b + c)`` when ``W``
acts on each row (example) alone. So when only such ops separate a layer L from a later point P, mixing L's
output with λ and partners is exactly mixing P's: for a ResNet50 cut at ``layer4`` with its own head (average
pool, flatten, ``fc``), mixing the (B, 2048, 7, 7) map equals mixing the (B, 2048) pooled features, and equals
mixing the logits.

Two chains are read from the traced train graph (:mod:`hookmix.graph.cutpoints`), starting at L's output:

* the *fixed* chain — ops without parameters that act on each row alone and linearly, and that the eval
  graph computes too, node by node with the same constants (a head-only job extracts features in eval
  mode and trains on them in train mode). Its end is the *cheapest equivalent point*: a head-only job can
  cache the features there (2,048 values per image instead of 2,048×7×7), as long as the plan needs no
  spatial structure (CutMix does);
* the *affine* chain — the fixed chain continued through ops that are affine in their input whatever
  their (trainable) weights: ``Linear``, convolutions, scaling by a one-element parameter. When it reaches
  the model's output, mixing L is logit mixup.

The analysis claims nothing it has not proven; "unknown whenever unsure" is built in, not checked after:

* an op counts only when it is in :data:`_RULES` (or is a module of exactly a listed type) *with every
  argument it was given*: the arguments are bound to the signature the rule lists, and one it does not
  list (``rounding_mode="floor"``, ``dtype=``, ``alpha=``) makes the op unknown. Each rule then checks the
  values: dims that are literal positive ints (never the batch axis), a ``permute`` that keeps axis 0
  first, a ``reshape`` / ``view`` whose first size is the batch size of a tensor of the chain, a division
  of the chain's tensor (``x / c``; ``c / x`` is not linear);
* a constant that scales or shifts must be batch-free: a Python number, a shape read, or a parameter /
  buffer of one element. A tensor whose shape could line up with the batch axis (a (B, 1) buffer) gives
  each row its own factor, which does not commute with mixing;
* a value used twice ends the chain, and every read of it counts except reads of its shape: ``f.data``
  and ``f.detach()`` are uses (mixing L changes them, mixing P does not);
* "≡ M input" names a module only when that module's input provably is a point of the fixed chain;
  otherwise the op itself is named.

Anything else ends a chain: a nonlinearity, a normalisation (``nn.LayerNorm``, BatchNorm in train mode),
dropout with p > 0 (each row gets its own mask), an op whose batch axis cannot be read from the graph. A
model that cannot be traced, and a layer that is not a cut point, are *unknown*. The equivalence is that of
mixup (a lerp); CutMix pastes boxes of a map, which pooling does not commute with. A module the tracer keeps
whole (``fc``, ``avgpool``) is read only while it has no forward hook: the graph does not show what a hook does.
"""

from __future__ import annotations

import functools
import inspect
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from hookmix.core.errors import HookmixWarning, UsageError
from hookmix.graph.cutpoints import CutPoints, UntraceableError, cut_points

INPUT = "input"
FIXED = "fixed"
AFFINE = "affine"

__all__ = [
    "MixEquivalence",
    "SameMixPointWarning",
    "chain_end",
    "mix_equivalence",
    "same_mix_points",
    "warn_same_mix_points",
]


class SameMixPointWarning(HookmixWarning):
    """Two layers given to a mixer are the same mixing point for mixup (only linear ops separate them)."""


_FIXED_MODULES = frozenset(
    {
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d,
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AvgPool3d,
        nn.Identity,
    }
)
_DROPOUT_MODULES = frozenset({nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d})
_AFFINE_MODULES = frozenset({nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d})
_METADATA_METHODS = frozenset({"size", "dim"})
_METADATA_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})


@dataclass(frozen=True)
class MixEquivalence:
    """Where mixing module ``layer``'s output (mixup) is the same as mixing later in the model.

    Attributes:
        layer: the module name.
        known: ``False`` when the model cannot be traced or ``layer`` is not a cut point: nothing is claimed.
        fixed_ops: the fixed linear ops after the layer, e.g. ``("avgpool", "flatten")``; caching their
            output instead of the layer's trains the same head.
        stop: what ends the fixed chain, e.g. ``"fc"`` (its input is the cheapest equivalent point): a module
            name, an op and the module it runs in (``"tanh in trunk"``) when that module's own input is not
            the equivalent point, or ``"output"`` when only fixed ops follow the layer; ``None`` when unknown.
        same_as_output: only linear and affine ops follow the layer, so mixing it is logit mixup.
    """

    layer: str
    known: bool
    fixed_ops: tuple[str, ...] = ()
    stop: str | None = None
    same_as_output: bool = False

    def describe(self) -> str:
        """One cell of ``hookmix layers``: ``"≡ fc input, ≡ output"``, ``"≡ input of tanh in trunk"``,
        ``"≡ output"``, ``""`` (mixing here is its own point) or ``"?"`` (unknown)."""
        if not self.known:
            return "?"
        parts = []
        if self.fixed_ops and self.stop is None:
            parts.append(f"≡ {_phrase('output', self.fixed_ops[-1])}")
        elif self.fixed_ops and self.stop != "output":
            parts.append(f"≡ {_phrase('input', str(self.stop))}")
        if self.same_as_output:
            parts.append("≡ output")
        return ", ".join(parts)


def _phrase(side: str, point: str) -> str:
    """``"fc input"`` for a module, ``"input of tanh in trunk"`` for an op (a module name has no space)."""
    return f"{side} of {point}" if " " in point else f"{point} {side}"


@dataclass(frozen=True)
class _Chains:
    fixed: tuple[fx.Node, ...]
    affine: tuple[fx.Node, ...]
    stop: fx.Node | None
    reaches_output: bool

    def shared(self, count: int) -> _Chains:
        """The chains with only the first ``count`` fixed ops kept fixed (the rest are still affine)."""
        return _Chains(self.fixed[:count], self.fixed[count:] + self.affine, self.stop, self.reaches_output)


@dataclass(frozen=True)
class _Walk:
    """What a rule may read: the model, its analysis, the chain's tensor the op reads (``source``) and every
    tensor of the chain so far (their axis 0 is the batch)."""

    model: nn.Module
    points: CutPoints
    source: fx.Node
    chain: frozenset[fx.Node]


def _flat_args(node: fx.Node) -> list[Any]:
    out: list[Any] = []
    fx.node.map_aggregate((node.args, node.kwargs), out.append)
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dims(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _positive(value: Any) -> bool:
    """Every dim in ``value`` is a literal int >= 1 (never the batch axis; negative dims are not read)."""
    dims = _dims(value)
    return bool(dims) and all(_is_int(d) and d >= 1 for d in dims)


def _varargs(values: tuple[Any, ...]) -> list[Any]:
    """``x.permute(0, 2, 1)`` and ``x.permute((0, 2, 1))`` alike: the sizes or dims as one list."""
    return list(values[0]) if len(values) == 1 and isinstance(values[0], (tuple, list)) else list(values)


def _is_metadata(value: Any) -> bool:
    """``value`` is read from a tensor's shape, not its values (``x.size(1)``, ``x.shape[-1]``, ``x.ndim``):
    mixing keeps every shape, so it cannot change it."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target in _METADATA_METHODS:
        return not any(isinstance(a, fx.Node) for a in (*value.args[1:], *value.kwargs.values()))
    if value.op != "call_function":
        return False
    if value.target is getattr:
        return value.args[1] in _METADATA_ATTRIBUTES
    return value.target is operator.getitem and _is_metadata(value.args[0]) and _is_int(value.args[1])


def _shape_of(node: Any) -> fx.Node | None:
    """The tensor whose whole shape ``node`` is (``t.shape``, ``t.size()``), else ``None``."""
    if not isinstance(node, fx.Node) or not node.args or node.kwargs:
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
        return node.args[0]
    return node.args[0] if node.op == "call_method" and node.target == "size" and len(node.args) == 1 else None


def _batch_size_of(value: Any, chain: frozenset[fx.Node]) -> bool:
    """``value`` is ``t.size(0)``, ``t.shape[0]`` or ``t.size()[0]`` of a tensor ``t`` of the chain."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target == "size" and len(value.args) == 2 and not value.kwargs:
        return value.args[0] in chain and _is_int(value.args[1]) and value.args[1] == 0
    if value.op == "call_function" and value.target is operator.getitem:
        return _is_int(value.args[1]) and value.args[1] == 0 and _shape_of(value.args[0]) in chain
    return False


def _attribute(model: nn.Module, value: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (a parameter, a buffer, a tensor attribute), else ``None``."""
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        return None
    try:
        found = functools.reduce(getattr, str(value.target).split("."), model)
    except AttributeError:
        return None
    return found if isinstance(found, torch.Tensor) else None


def _constant_kind(model: nn.Module, value: Any) -> str | None:
    """How scaling or shifting by ``value`` acts: ``"fixed"`` for a number (a literal or a shape read),
    ``"affine"`` for a parameter or buffer of one element (it may be trained or updated), ``None`` for
    anything else — a tensor that could line up with the batch axis gives each row its own factor."""
    if isinstance(value, (int, float)) or _is_metadata(value):
        return FIXED
    tensor = _attribute(model, value)
    return AFFINE if tensor is not None and tensor.numel() == 1 and tensor.dim() <= 1 else None


def _reduce(a: dict[str, Any], walk: _Walk) -> str | None:
    return FIXED if _positive(a["dim"]) and isinstance(a["keepdim"], bool) else None


def _flatten(a: dict[str, Any], walk: _Walk) -> str | None:
    return FIXED if _positive(a["start_dim"]) and _is_int(a["end_dim"]) else None


def _one_dim(a: dict[str, Any], walk: _Walk) -> str | None:
    return FIXED if _positive(a["dim"]) else None


def _transpose(a: dict[str, Any], walk: _Walk) -> str | None:
    return FIXED if _positive([a["dim0"], a["dim1"]]) else None


def _permute(a: dict[str, Any], walk: _Walk) -> str | None:
    dims = _varargs(a["dims"])
    return FIXED if dims and all(_is_int(d) for d in dims) and dims[0] == 0 else None


def _reshape(a: dict[str, Any], walk: _Walk) -> str | None:
    shape = _varargs(a["shape"])
    return FIXED if shape and _batch_size_of(shape[0], walk.chain) else None


def _unchanged(a: dict[str, Any], walk: _Walk) -> str | None:
    return FIXED


def _getitem(a: dict[str, Any], walk: _Walk) -> str | None:
    index = a["index"]
    first = index[0] if isinstance(index, tuple) and index else index
    return FIXED if isinstance(first, slice) and first == slice(None) else None


def _pool(a: dict[str, Any], walk: _Walk) -> str | None:
    return None if any(isinstance(v, fx.Node) for k, v in a.items() if k != "input") else FIXED


def _scale_or_shift(a: dict[str, Any], walk: _Walk) -> str | None:
    return _constant_kind(walk.model, a["b"] if a["a"] is walk.source else a["a"])


def _divide(a: dict[str, Any], walk: _Walk) -> str | None:
    return _constant_kind(walk.model, a["b"]) if a["a"] is walk.source else None  # c / x is not linear in x


def _linear(a: dict[str, Any], walk: _Walk) -> str | None:
    weight, bias = _attribute(walk.model, a["weight"]), _attribute(walk.model, a["bias"])
    bias_ok = a["bias"] is None or (bias is not None and bias.dim() == 1)
    return AFFINE if weight is not None and weight.dim() == 2 and bias_ok else None


@dataclass(frozen=True)
class _Rule:
    """An op the analysis reads: the only arguments it may be given, and what their values must be."""

    signature: inspect.Signature
    check: Callable[[dict[str, Any], _Walk], str | None]


def _rule(arguments: Callable[..., None], check: Callable[[dict[str, Any], _Walk], str | None]) -> _Rule:
    return _Rule(inspect.signature(arguments), check)


def _method_and_function(name: str, function: Any, rule: _Rule) -> dict[tuple[str, Any], _Rule]:
    return {("call_method", name): rule, ("call_function", function): rule}


def _avg_pool_arguments(
    input: Any,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    ceil_mode: Any = False,
    count_include_pad: Any = True,
    divisor_override: Any = None,
) -> None:
    """The arguments ``F.avg_pool1d`` / ``2d`` / ``3d`` take: every value of each keeps pooling linear per row."""


_REDUCE = _rule(lambda input, dim, keepdim=False: None, _reduce)
_RESHAPE = _rule(lambda input, *shape: None, _reshape)
_ADAPTIVE_POOL = _rule(lambda input, output_size: None, _pool)
_POOL = _rule(_avg_pool_arguments, _pool)
_SCALE_OR_SHIFT = _rule(lambda a, b: None, _scale_or_shift)
_DIVIDE = _rule(lambda a, b: None, _divide)

#: The ops read, keyed by (fx op, target). An op missing here, or given an argument its rule does not list,
#: ends the chain.
_RULES: dict[tuple[str, Any], _Rule] = {
    **_method_and_function("mean", torch.mean, _REDUCE),
    **_method_and_function("sum", torch.sum, _REDUCE),
    **_method_and_function("flatten", torch.flatten, _rule(lambda input, start_dim=0, end_dim=-1: None, _flatten)),
    **_method_and_function("squeeze", torch.squeeze, _rule(lambda input, dim=None: None, _one_dim)),
    **_method_and_function("unsqueeze", torch.unsqueeze, _rule(lambda input, dim: None, _one_dim)),
    **_method_and_function("transpose", torch.transpose, _rule(lambda input, dim0, dim1: None, _transpose)),
    **_method_and_function("permute", torch.permute, _rule(lambda input, *dims: None, _permute)),
    **_method_and_function("reshape", torch.reshape, _RESHAPE),
    ("call_method", "view"): _RESHAPE,
    ("call_method", "contiguous"): _rule(lambda input: None, _unchanged),
    ("call_function", operator.getitem): _rule(lambda input, index: None, _getitem),
    **{("call_function", f): _ADAPTIVE_POOL for f in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)},
    ("call_function", F.adaptive_avg_pool3d): _ADAPTIVE_POOL,
    **{("call_function", f): _POOL for f in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)},
    **_method_and_function("mul", torch.mul, _SCALE_OR_SHIFT),
    **_method_and_function("add", torch.add, _SCALE_OR_SHIFT),
    **_method_and_function("sub", torch.sub, _SCALE_OR_SHIFT),
    **{("call_function", f): _SCALE_OR_SHIFT for f in (operator.mul, operator.add, operator.sub)},
    **_method_and_function("div", torch.div, _DIVIDE),
    ("call_function", operator.truediv): _DIVIDE,
    ("call_function", F.linear): _rule(lambda input, weight, bias=None: None, _linear),
}


def _module_kind(module: nn.Module, node: fx.Node, source: fx.Node) -> str | None:
    """How a module of exactly a listed type, called on ``source`` alone, acts on it."""
    if len(node.args) != 1 or node.args[0] is not source or node.kwargs:
        return None
    if module._forward_hooks or module._forward_pre_hooks:
        return None  # a hook may rewrite what the module returns; the graph shows a module kept whole without it
    kind = type(module)
    if kind in _FIXED_MODULES or (kind in _DROPOUT_MODULES and module.p == 0):
        return FIXED
    if kind is nn.Flatten:
        return FIXED if _positive(module.start_dim) and _is_int(module.end_dim) else None
    return AFFINE if kind in _AFFINE_MODULES else None


def _kind(walk: _Walk, node: fx.Node) -> str | None:
    """``"fixed"``, ``"affine"`` or ``None`` (ends both chains): how ``node`` acts on ``walk.source``."""
    flat = _flat_args(node)
    if sum(a is walk.source for a in flat) != 1:
        return None
    read = [a for a in flat if isinstance(a, fx.Node) and a is not walk.source and walk.points.depends_on_input(a)]
    if not all(_is_metadata(a) for a in read):
        return None
    if node.op == "call_module":
        return _module_kind(walk.model.get_submodule(str(node.target)), node, walk.source)
    rule = _RULES.get((node.op, node.target)) if node.op in ("call_function", "call_method") else None
    if rule is None:
        return None
    try:
        bound = rule.signature.bind(*node.args, **node.kwargs)
    except TypeError:  # an argument the rule does not list, e.g. rounding_mode="floor"
        return None
    bound.apply_defaults()
    if bound.arguments.get("input", walk.source) is not walk.source:
        return None
    return rule.check(bound.arguments, walk)


def _data_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values: all but shape reads (``f.data``, ``f.detach()`` count)."""
    return [user for user in node.users if not _is_metadata(user)]


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
            return _Chains(tuple(fixed), tuple(affine), user, user.args[0] is node)
        kind = _kind(_Walk(model, points, node, frozenset((start, *fixed, *affine))), user)
        if kind is None:
            return _Chains(tuple(fixed), tuple(affine), user, False)
        (fixed if kind == FIXED and not affine else affine).append(user)
        node = user


def _name(node: fx.Node) -> str:
    """A node as ``hookmix layers`` names it: its module, or the op and the module it runs in."""
    if node.op == "output":
        return "output"
    if node.op == "call_module":
        return str(node.target)
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.name)
    stack = node.meta.get("nn_module_stack") or {}
    return f"{what} in {next(reversed(stack.values()))[0]}" if stack else str(what)


def _modules_of(node: fx.Node) -> list[str]:
    """The modules ``node`` runs in, outermost first."""
    return [str(path) for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _fed_only_by(points: CutPoints, nodes: set[fx.Node], allowed: set[fx.Node]) -> bool:
    """Whether the values ``nodes`` read from outside themselves come from one node of ``allowed`` only
    (parameters and shape reads aside): then that node is their input."""
    outside = {
        src
        for node in nodes
        for src in node.all_input_nodes
        if src not in nodes and points.depends_on_input(src) and not _is_metadata(src)
    }
    return len(outside) == 1 and outside <= allowed


def _point(points: CutPoints, node: fx.Node, fixed: set[fx.Node]) -> str:
    """How to name the point just before ``node``, the first op past the fixed chain ``fixed``, for "≡ X
    input": the module it calls; the module it runs in when that module, called once, reads only a tensor
    of the fixed chain (``"head.norm"`` for the layer_norm inside it); else the op and where it runs
    (``"tanh in trunk"``, ``"mul in forward"``): the enclosing module's input may be another tensor."""
    if node.op in ("output", "call_module"):
        return _name(node)
    modules = _modules_of(node)
    if not modules:
        return f"{_name(node)} in forward"
    scope = {n for n in points.graph.nodes if modules[-1] in _modules_of(n)}
    return modules[-1] if _called_once(points, modules[-1]) and _fed_only_by(points, scope, fixed) else _name(node)


def _called_once(points: CutPoints, module: str) -> bool:
    try:
        points.node(module)
    except KeyError:
        return False
    return True


def _start(points: CutPoints, layer: str) -> fx.Node | None:
    """The node holding ``layer``'s output, or the single input for ``"input"``; ``None``: not a cut point."""
    if layer == INPUT:
        inputs = [node for node in points.graph.nodes if node.op == "placeholder"]
        return inputs[0] if len(inputs) == 1 else None
    return points.node(layer) if points.why_not(layer) is None else None


def _same(a: Any, b: Any, pairs: dict[fx.Node, fx.Node]) -> bool:
    """Whether ``a`` (in one mode's graph) and ``b`` (in the other's) compute the same value: nodes by op,
    target and arguments, constants by type and value. ``pairs`` holds the nodes matched so far."""
    if isinstance(a, fx.Node) and isinstance(b, fx.Node):
        if a in pairs:
            return pairs[a] is b
        same = a.op == b.op and a.target == b.target and _same((a.args, a.kwargs), (b.args, b.kwargs), pairs)
        if same:
            pairs[a] = b
        return same
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y, pairs) for x, y in zip(a, b))
    if isinstance(a, dict) and type(a) is type(b):
        return a.keys() == b.keys() and all(_same(a[k], b[k], pairs) for k in a)
    if isinstance(a, slice) and isinstance(b, slice):
        return _same((a.start, a.stop, a.step), (b.start, b.stop, b.step), pairs)
    return type(a) is type(b) and not isinstance(a, fx.Node) and bool(a == b)


def _chains_in(model: nn.Module, layer: str, training: bool) -> tuple[CutPoints, fx.Node, _Chains] | None:
    """The chains after ``layer`` in the graph of one mode; ``None`` when it cannot be traced or ``layer``
    is not a cut point there."""
    try:
        points = cut_points(model, training=training)
    except UntraceableError:
        return None
    start = _start(points, layer)
    return None if start is None else (points, start, _chains(model, points, start))


def _analysis(model: nn.Module, layer: str, training: bool) -> tuple[CutPoints, fx.Node, _Chains] | None:
    """The chains after ``layer`` in the given mode's graph, its fixed chain cut to the ops that the other
    mode's graph computes too, node by node with the same constants: features cached there (in eval mode)
    are what the head reads in train mode. ``x*2 if self.training else x*3`` is not shared."""
    found = _chains_in(model, layer, training)
    if found is None:
        return None
    points, start, chains = found
    other = _chains_in(model, layer, not training)
    if other is None:
        return points, start, chains.shared(0)
    pairs = {start: other[1]}
    shared = 0
    while shared < min(len(chains.fixed), len(other[2].fixed)) and _same(
        chains.fixed[shared], other[2].fixed[shared], pairs
    ):
        shared += 1
    return points, start, chains.shared(shared)


def mix_equivalence(model: nn.Module, layer: str) -> MixEquivalence:
    """Where mixing ``layer``'s output (or ``"input"``: the model's single input, e.g. a head's features) is
    the same as mixing later in ``model`` (read from its train graph; the fixed ops are those the eval graph
    shares).

    ``mix_equivalence(resnet50, "layer4")`` gives ``fixed_ops=("avgpool", "flatten")``, ``stop="fc"`` and
    ``same_as_output=True``; a ViT block, followed by a LayerNorm, gives no equivalent point. Unknown
    (``known=False``) when torch.fx cannot trace the model or ``layer`` is not a cut point.
    """
    found = _analysis(model, layer, True)
    if found is None:
        return MixEquivalence(layer, known=False)
    points, start, chains = found
    after = chains.affine[0] if chains.affine else chains.stop
    return MixEquivalence(
        layer,
        known=True,
        fixed_ops=tuple(_name(n) for n in chains.fixed),
        stop=None if after is None else _point(points, after, {start, *chains.fixed}),
        same_as_output=chains.reaches_output,
    )


def chain_end(model: nn.Module, layer: str, training: bool) -> fx.Node:
    """The node of ``model``'s graph in the given mode where the fixed chain after cut point ``layer`` (or
    ``"input"``) ends: the cheapest point equivalent to ``layer`` for mixup (``layer``'s own output when no
    fixed op follows).

    Only the ops the train and the eval graph share, node by node with their constants, count, so a
    backbone cut there returns the same tensor in both modes.
    """
    found = _analysis(model, layer, training)
    if found is None:
        raise UsageError(f"layer={layer!r} is not a cut point of {type(model).__name__}; nothing to cut past.")
    _, start, chains = found
    return chains.fixed[-1] if chains.fixed else start


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
