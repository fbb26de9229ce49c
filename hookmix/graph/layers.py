"""Layer selection by name: resolve user specs to module names, and list a model's layers.

A *layer spec* is a dotted module name (``"layer4"``, ``"blocks.11"``), a glob (``"layer*"``,
``"blocks.*"``; ``*`` and ``?`` stay inside one dotted component, ``**`` crosses dots), one of the
pseudo-layers ``"input"`` (the model's input: input mixup) and ``"output"`` (the model's output: logit
mixup), ``"stages"`` (the model's stage outputs, see :func:`hookmix.graph.cutpoints.stage_names`), or a list
of those. ``"stages"`` always means the stage list, also for timm ConvNeXt, whose ``stages`` module has
the output of its last stage.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from hookmix.core.checks import check_int, modes_restored
from hookmix.core.errors import UsageError
from hookmix.core.tree import first_tensor
from hookmix.graph.cutpoints import CutPointWarning, UntraceableError, cut_points, stage_names
from hookmix.graph.equivalence import mix_equivalence

INPUT = "input"
OUTPUT = "output"
PSEUDO_LAYERS = (INPUT, OUTPUT)
STAGES = "stages"

__all__ = [
    "LayerInfo",
    "list_layers",
    "format_layers",
    "resolve_layers",
    "module_names",
    "unknown_layer_error",
    "STAGES",
]


def module_names(model: nn.Module) -> list[str]:
    """All named submodules of ``model`` (the root itself, named ``""``, excluded)."""
    return [name for name, _ in model.named_modules() if name]


def _close_hint(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    if close:
        return f"closest names: {', '.join(close)}"
    top = [c for c in candidates if "." not in c][:8]
    return f"top-level layers are: {', '.join(top)}" if top else "the model has no submodules"


def unknown_layer_error(argument: str, name: str, candidates: Sequence[str]) -> UsageError:
    """A :class:`~hookmix.UsageError` for a layer name that is not in ``candidates``, listing the closest ones."""
    return UsageError(
        f"{argument}={name!r} is not a layer of this model; {_close_hint(name, candidates)}. "
        "Use hookmix.list_layers(model, example_input) or `hookmix layers MODEL` to see every name."
    )


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        ch = pattern[i]
        out.append({"*": r"[^.]*", "?": r"[^.]"}.get(ch, re.escape(ch)))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?")


def resolve_layers(model: nn.Module, spec: str | Sequence[str], argument: str = "layers") -> list[str]:
    """Expand a layer spec into an ordered, duplicate-free list of names.

    Each returned name is a submodule name of ``model`` or a pseudo-layer (``"input"``, ``"output"``);
    ``"stages"`` expands to the model's stage outputs in forward order. Raises ``ValueError`` for unknown
    names (listing close matches), globs that match nothing and models without stages, and ``TypeError``
    for specs that are not strings.
    """
    if isinstance(spec, str):
        items: list[Any] = [spec]
    elif isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        items = list(spec)
        if not items:
            raise UsageError(f"{argument}=[] is empty; name at least one layer, e.g. {argument}='layer4'.")
    else:
        raise TypeError(
            f"{argument} must be a layer name, a glob or a list of them, got {type(spec).__name__} {spec!r}."
        )
    names = module_names(model)
    known = set(names)
    resolved: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{argument} entries must be strings, got {type(item).__name__} {item!r}.")
        if item == STAGES:
            matches = stage_names(model)
        elif item in PSEUDO_LAYERS or item in known:
            matches = [item]
        elif _is_glob(item):
            regex = _glob_regex(item)
            matches = [n for n in names if regex.match(n)]
            if not matches:
                stem = item.replace("*", "").replace("?", "")
                raise UsageError(
                    f"{argument}={item!r} matches no layer of this model ('*' stays inside one dotted "
                    f"part, '**' crosses dots); {_close_hint(stem, names)}."
                )
        else:
            raise unknown_layer_error(argument, item, [*PSEUDO_LAYERS, *names])
        resolved.extend(m for m in matches if m not in resolved)
    return resolved


@dataclass(frozen=True)
class LayerInfo:
    """One row of :func:`list_layers`: a module, its type, the shape of its output and its size.

    ``output_shape`` is the shape of the first tensor in the module's output (``None`` when the
    forward did not reach the module); ``params`` counts the module's parameters, its children's
    included; ``calls`` is how many times the forward called it. ``cut_point`` says whether the
    module's output is a cut point (every path from the input to the output passes through it: a sound
    place to mix or split; see :mod:`hookmix.graph.cutpoints`), ``None`` when torch.fx cannot trace the model.
    ``same_as`` says where mixup at a cut point is the same as mixing later (:mod:`hookmix.graph.equivalence`):
    ``"≡ fc input, ≡ output"`` for ResNet ``layer4``, ``""`` when nothing later is equivalent (and for the
    rows that are no cut point or produce the output), ``"?"`` when the model cannot be analysed.
    """

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    params: int
    depth: int
    calls: int
    cut_point: bool | None = None
    same_as: str = ""


def _describe_shape(example_input: Any) -> str:
    """``example_input``'s tensor shapes for an error message: ``1x3x64x64``, or ``(1x3, 1x5)`` for several."""
    if isinstance(example_input, torch.Tensor):
        return "x".join(map(str, example_input.shape))
    values = example_input.values() if isinstance(example_input, dict) else example_input
    shapes = [_describe_shape(v) if isinstance(v, torch.Tensor) else type(v).__name__ for v in values]
    return f"({', '.join(shapes)})"


def _output_shapes(
    model: nn.Module, modules: list[tuple[str, nn.Module]], example_input: Any
) -> tuple[dict[str, tuple[int, ...] | None], dict[str, int]]:
    """The shape of each module's first output tensor, and how often it was called, in one eval-mode, no-grad
    forward of ``model`` on ``example_input``. A forward the model refuses (wrong channels, or a timm ViT
    given another image size than it was built for) is a :class:`~hookmix.UsageError` naming the input's
    shape and the model's complaint: the caller chose the input, so it is the caller's to fix."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    calls: dict[str, int] = {}

    def recorder(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            if name not in shapes:
                tensor = first_tensor(output)
                shapes[name] = tuple(tensor.shape) if tensor is not None else None

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in modules]
    try:
        with modes_restored(model, False), torch.no_grad():
            if isinstance(example_input, dict):
                model(**example_input)
            elif isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
    except (RuntimeError, AssertionError, ValueError) as err:
        complaint = next(iter(str(err).strip().splitlines()), "")
        raise UsageError(
            f"example_input of shape {_describe_shape(example_input)}: the model's forward refused it "
            f"({type(err).__name__}: {complaint}); give an input of the size and channels the model was built for."
        ) from err
    finally:
        for handle in handles:
            handle.remove()
    return shapes, calls


def list_layers(model: nn.Module, example_input: Any) -> list[LayerInfo]:
    """Run one forward of ``model`` on ``example_input`` and describe every module it contains.

    The forward runs in eval mode under ``torch.no_grad()`` (the model's mode is restored afterwards),
    so it neither mixes nor changes BatchNorm statistics. ``example_input`` is a tensor (e.g. ``(1, 3,
    224, 224)``), or a tuple / dict of positional / keyword arguments; an input the model's forward refuses
    is a :class:`~hookmix.UsageError`. Cut points are those of the train graph (where mixing happens); the
    row of the model itself (``"output"``) always is one.
    """
    modules = list(model.named_modules())
    shapes, calls = _output_shapes(model, modules, example_input)
    try:
        points = cut_points(model, training=True)
        cuts: set[str] | None = {"", *points.names}
        last = {name for name in points.names if not points.produces_output(name)}
    except UntraceableError:
        cuts, last = None, set()
    rows = []
    for name, module in modules:
        same_as = "?" if cuts is None else mix_equivalence(model, name).describe() if name in last else ""
        rows.append(
            LayerInfo(
                name=name or OUTPUT,
                type=type(module).__name__,
                output_shape=shapes.get(name),
                params=sum(p.numel() for p in module.parameters()),
                depth=0 if not name else name.count(".") + 1,
                calls=calls.get(name, 0),
                cut_point=None if cuts is None else name in cuts,
                same_as=same_as,
            )
        )
    return rows


def format_layers(rows: Sequence[LayerInfo], max_depth: int | None = None) -> str:
    """Render :func:`list_layers` rows as an aligned text table (names indented by depth).

    The ``cut`` column reads ``yes`` for cut points, ``no`` for other modules and ``?`` when the model
    could not be analysed; ``mixup here`` says where mixing a cut point is the same as mixing later.
    ``max_depth`` (``None``: all) keeps the names of at most that many dotted parts; the model's own row
    (``"output"``) is always shown.
    """
    if max_depth is not None:
        check_int("max_depth", max_depth, 1, " (None shows every depth; 1 the top-level names)")
    shown = [r for r in rows if max_depth is None or r.depth <= max_depth]
    table = [("name", "type", "output shape", "params", "cut", "mixup here")]
    for r in shown:
        shape = "x".join(str(s) for s in r.output_shape) if r.output_shape is not None else "-"
        label = "  " * max(r.depth - 1, 0) + r.name
        cut = {True: "yes", False: "no", None: "?"}[r.cut_point]
        table.append((label, r.type, shape if r.calls else "(not called)", f"{r.params:,}", cut, r.same_as))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for i, row in enumerate(table):
        lines.append(
            f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]:>{widths[3]}}  "
            f"{row[4]:<{widths[4]}}  {row[5]}".rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_mix_points(
    model: nn.Module,
    layers: str | Sequence[str],
    strict: bool = False,
    *,
    mode: str = "one",
    stacklevel: int = 2,
) -> None:
    """Warn once per layer of ``layers`` that is not a cut point of ``model`` (an error when ``strict``).

    Each :class:`hookmix.graph.cutpoints.CutPointWarning` names the path that bypasses the layer and the
    nearest cut points; ``"input"`` and ``"output"`` are always sound. With ``mode="all"`` (every layer
    mixed in the same forward, as :class:`hookmix.HookMixer`'s ``mode``) the layers are judged
    together: none is flagged when every path from the input to the output passes through one of them.
    When the model cannot be traced, one warning says the analysis was not possible and the layers are
    used unchecked (``strict=True``: a ``ValueError``). ``stacklevel`` is passed to
    :func:`warnings.warn` (2: the caller of this function).
    """
    check_resolved_mix_points(model, resolve_layers(model, layers), strict, mode=mode, stacklevel=stacklevel + 1)


def check_resolved_mix_points(
    model: nn.Module, resolved: Sequence[str], strict: bool, *, mode: str, stacklevel: int
) -> None:
    """:func:`check_mix_points` on names :func:`resolve_layers` already returned."""
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {type(strict).__name__} {strict!r}.")
    if mode not in ("one", "all"):
        raise UsageError(f"mode={mode!r} must be 'one' (one layer per step) or 'all' (every layer each step).")
    names = [name for name in resolved if name not in PSEUDO_LAYERS]
    if not names or (mode == "all" and any(name in PSEUDO_LAYERS for name in resolved)):
        return
    try:
        points = cut_points(model, training=True)
    except UntraceableError as err:
        if strict:
            raise UsageError(
                f"strict=True needs the cut-point analysis of {names}, which is not possible: {err} Pass "
                "strict=False to mix at these layers unchecked."
            ) from None
        warnings.warn(
            f"cut-point analysis of {names} not possible: {err} The layers are used as named, unchecked.",
            CutPointWarning,
            stacklevel=stacklevel,
        )
        return
    if mode == "all" and points.separates(names):
        return
    problems = [
        f"layer {name!r} is not a cut point of {points.model_type}: it {reason}, so mixing there may leave "
        f"part of what the rest of the network sees unmixed; {points.suggestion(name)} ('input' and 'output' "
        "are always sound)."
        for name in names
        if (reason := points.why_not(name)) is not None
    ]
    if strict and problems:
        raise UsageError(" ".join(problems) + " Choose cut points, or pass strict=False to mix there anyway.")
    for problem in problems:
        warnings.warn(f"{problem} Pass strict=True to make this an error.", CutPointWarning, stacklevel=stacklevel)
