"""Where mixing a layer equals mixing later (hookmix.graph.equivalence), checked against gradients.

The mixer mixes at layer L; λ and partners are recovered from L's activations with our own hooks; then the
same mix is done by hand at a later point P of an unmixed forward, and the head's gradients are compared:
equal (< 1e-5) where the analysis claims L ≡ P, different (> 1e-3: the claim would be false) where it must not.
Measured on this CPU: claimed cases agree to < 3e-7, unclaimed ones differ by 9e-3 to 0.41 (1 and 2 threads alike).

Plausible maintainer bugs and the test that catches each (``test_each_rule_...[case]`` unless named):
- an op read by name only, its keyword arguments ignored (``rounding_mode="floor"``): ``div-rounding-mode``;
- modules read with ``isinstance`` (a subclass overriding forward, kept whole by the tracer): ``linear-subclass``;
- a read outside autograd not counted as a use: ``data-read`` / ``detach-read``, and
  ``test_a_split_past_the_fixed_ops_keeps_reads_outside_autograd`` (the split head returned ``None``);
  shape reads counted as uses (too strict): ``x-over-width``, ``view-keeps-batch``;
- a tensor constant taken for a scaling whatever its shape: ``per-row-buffer``; one-element ones refused:
  ``one-element-parameter``;
- ``c / x`` read as ``x / c``: ``c-over-x`` (and ``x-over-c`` for the rule being too strict);
- ``nn.LayerNorm`` listed among the affine modules: ``layer-norm`` (``layer-norm-input``: its input is equivalent);
- reshape / view / permute / indexing that move the batch axis or reorder rows accepted: ``reshape-pairs``,
  ``view-pairs``, ``reshape-by-another-size`` (a batch size read from a tensor off the chain),
  ``permute-batch``, ``rows-reordered``;
- the index rule reading the wrong element or accepting any slice (``g[1:]`` drops a row):
  ``channels-selected``, ``whole-slice``, ``test_a_slice_that_drops_rows_ends_the_chain``; the batch size read
  as ``shape[0]`` missed: ``reshape-by-shape0``; any other first size taken for the batch size:
  ``reshape-by-a-buffer-count``; a factor made in forward (no attribute) read as one:
  ``per-row-factor-made-in-forward``; a reduction over axis 0 accepted:
  ``test_a_sum_over_the_batch_axis_ends_the_chain``; ``nn.Flatten``: ``flatten-module``; ``c * x`` read from
  the wrong side: ``parameter-times-x``;
  a divisor's parameter not looked up: ``x-over-one-element-parameter``;
- ``transpose`` / ``squeeze`` / ``unsqueeze`` / ``F.linear`` rules never exercised (mutmut found no test reaching
  them): ``transpose-*``, ``unsqueeze-*``, ``functional-linear*`` (a (B, 5) bias shifts each row its own way);
- train and eval graphs matched by op type only, so features cached in eval mode are another branch's:
  ``test_ops_that_differ_between_train_and_eval_are_not_cached_past``;
- "≡ M input" naming the module an op runs in when M's input is another tensor:
  ``test_the_display_never_names_an_enclosing_modules_input``;
- a forward hook on a module the tracer keeps whole ignored: ``test_a_hooked_module_is_not_read``;
- dropout with p > 0, flattening the batch axis, ``x * x`` read as fixed:
  ``test_functional_ops_are_read_conservatively``.
- the eval graph read instead of the train graph (a tanh only in train mode): ``nonlinear-only-in-train``;
  the fixed chain kept when the eval graph cannot be traced:
  ``test_an_eval_graph_that_cannot_be_traced_shares_no_fixed_op``; the first op's match between modes skipped:
  ``test_ops_that_differ_between_train_and_eval_are_not_cached_past[first-op-differs]``;
- a chain that reaches the output through fixed ops only shown as "≡ <op> output":
  ``test_fixed_ops_up_to_the_output_make_the_layer_the_output``; ``same_as_output`` / ``known`` / ``layer`` left
  ``None``: the whole-dataclass asserts (``test_a_value_used_twice_claims_nothing_past_it``, ...);
- ``"input"`` (a head's features) not found, or the first of two inputs taken: ``test_the_input_of_a_head_is_analysed``,
  ``test_a_model_with_two_inputs_has_no_input_point``.
- train and eval nodes matched without their keyword arguments or slices, or a constant against a node:
  ``test_ops_that_differ_between_train_and_eval_are_not_cached_past[same-keywords / keyword-value-differs /
  same-slice-by-a-size / slice-or-list / number-or-shape-read]``;
- ``t.size()[0]`` not read as the batch size: ``reshape-by-size-tuple``; a submodule named ``output`` taken for the
  model's output: ``module-named-output``; a module read with a shape argument not named: ``module-reading-a-shape``;
- the display: a fixed op used twice (``test_a_fixed_op_whose_output_is_used_twice_is_the_point``), the node's
  name (``adaptive_avg_pool2d_1``) shown instead of the op's (``test_fixed_ops_up_to_the_output_...``), a module
  called twice named (``test_a_module_called_twice_is_not_named``), a module fed by the layer alone not named
  (``test_the_stop_names_a_module_fed_by_the_layer_alone``); the warning's text:
  ``test_the_warning_names_each_pair_of_same_points``.
- found by ``make mutate`` (mutmut), each a rule garbled: permute's dims given as one tuple not unpacked, or the
  unpacking taking the wrong element: ``permute-as-one-tuple``; one size of a reshape iterated as if it were the
  shape: ``reshape-to-one-size``; ``and`` turned ``or`` in the ``shape[0]`` test (any index, or a tensor off the
  chain): ``reshape-by-another-shape0``; any other shape read (``g.dim()``) taken for the batch size:
  ``reshape-by-a-dim-count`` (it also catches any method call taken for ``t.size(0)``: ``g.dim()`` crashed);
  a 1-D tensor of B elements taken for a one-element scaling: ``per-row-vector-buffer``; a (1, 1) one-element
  tensor taken for one (it broadcasts (B,) to (1, B)): ``broadcast-by-a-1x1-parameter``;
  ``nn.Flatten(0)`` read as fixed (its start dim not checked): ``flatten-module-batch``; the int check taking any
  non-bool for a literal dim (a dim read in forward crashed the analysis): ``transpose-by-a-dim-read``; a module
  called with its input as a keyword (no positional argument) crashing the check of its arguments:
  ``test_a_module_called_with_its_input_as_a_keyword_is_not_read``.

Analyse a model (``mix_equivalence``, ``split``, ``list_layers``) before hooks are put on it: the trace is
cached per model and a forward hook on a traced-through module is traced into the graph.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from hookmix import HookMixer, mix_equivalence, split
from hookmix.graph import equivalence
from hookmix.graph.equivalence import MixEquivalence, SameMixPointWarning, same_mix_points, warn_same_mix_points
from hookmix.graph.layers import format_layers, list_layers
from tests.conftest import recover_mix

B = 6


def _probe(model: nn.Module, head: tuple[str, ...]) -> nn.Module:
    """The linear-probe idiom: everything frozen and in eval mode except the modules named in ``head``."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(head))
    model.eval()
    for name in head:
        model.get_submodule(name).train()
    return model


def _seeded(factory, *args, **kwargs) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return factory(*args, **kwargs)


def tv_resnet18() -> nn.Module:
    return _probe(_seeded(torchvision.models.resnet18, num_classes=5), ("fc",))


def timm_convnext() -> nn.Module:
    return _probe(_seeded(timm.create_model, "convnext_atto", num_classes=5), ("head.norm", "head.fc"))


def timm_vit() -> nn.Module:
    model = _seeded(timm.create_model, "vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8, depth=4)
    return _probe(model, ("head",))


def _grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])  # unused: no grad


def _data(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(B, 3, size, size, generator=gen), torch.randint(0, 5, (B,), generator=gen)


def mixed_by_hookmix(model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor):
    """Gradients of one mixed step at ``layer`` and the λ / partners recovered from its activations."""
    seen: dict[str, torch.Tensor] = {}
    module = model.get_submodule(layer)
    module.register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o.detach().clone()))
    with HookMixer(model, layer, alpha=1.0, num_classes=5, seed=7) as mixer:
        module.register_forward_hook(lambda m, a, o: seen.__setitem__("mixed", o.detach().clone()))
        model.zero_grad()
        step = mixer.plan(y)
        step.loss(nn.CrossEntropyLoss(), model(x)).backward()
    lam, partners, residual = recover_mix(seen["raw"], seen["mixed"])
    assert residual.max() < 1e-4 and (lam - lam[0]).abs().max() < 1e-4 and 0.05 < lam[0] < 0.95
    module._forward_hooks.clear()
    return _grads(model), float(lam[0]), partners


def mixed_by_hand(model: nn.Module, point: str, lam: float, partners: torch.Tensor, x, y) -> torch.Tensor:
    """Gradients of the same mix done by hand at ``point``: a module's output, ``"<module> input"`` or
    ``"output"`` (the logits)."""
    if point.endswith(" input"):
        module = model.get_submodule(point.removesuffix(" input"))
        handle = module.register_forward_pre_hook(lambda m, a: (lam * a[0] + (1 - lam) * a[0][partners], *a[1:]))
    else:
        module = model if point == "output" else model.get_submodule(point)
        handle = module.register_forward_hook(lambda m, a, o: lam * o + (1 - lam) * o[partners])
    model.zero_grad()
    out = model(x)
    (lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[partners])).backward()
    handle.remove()
    return _grads(model)


@pytest.mark.parametrize(
    "factory, size, layer, point, claimed",
    [
        (tv_resnet18, 64, "layer4", "avgpool", True),
        (tv_resnet18, 64, "layer4", "output", True),
        (tv_resnet18, 64, "layer3", "output", False),
        (timm_convnext, 64, "stages.3", "head.global_pool", True),
        (timm_convnext, 64, "stages.3", "output", False),
        (timm_vit, 32, "blocks.3", "output", False),
    ],
    ids=["resnet-avgpool", "resnet-output", "resnet-layer3", "convnext-pool", "convnext-output", "vit-output"],
)
def test_the_claim_holds_in_gradients(factory, size, layer, point, claimed) -> None:
    model = factory()
    x, y = _data(size)
    assert ((layer, point) in same_mix_points(model, [layer, point])) == claimed
    hooked, lam, partners = mixed_by_hookmix(model, layer, x, y)
    by_hand = mixed_by_hand(model, point, lam, partners, x, y)
    error = ((hooked - by_hand).norm() / by_hand.norm()).item()
    if claimed:
        assert error < 1e-5, error
    else:
        assert error > 1e-3, error


def test_resnet50_layer4_is_the_fc_input_and_the_output() -> None:
    model = torchvision.models.resnet50()
    assert mix_equivalence(model, "layer4") == MixEquivalence("layer4", True, ("avgpool", "flatten"), "fc", True)
    rows = {r.name: r for r in list_layers(model, torch.zeros(1, 3, 64, 64))}
    assert rows["layer4"].same_as == "≡ fc input, ≡ output"
    assert rows["layer3"].same_as == "" and rows["fc"].same_as == "" and rows["layer4.2.conv1"].same_as == ""
    assert "≡ fc input, ≡ output" in format_layers(list(rows.values()), max_depth=1)


def test_layer_norms_and_nonlinear_heads_end_the_chain() -> None:
    vit = mix_equivalence(timm_vit(), "blocks.3")
    assert vit.known and vit.describe() == "" and vit.fixed_ops == () and not vit.same_as_output
    convnext = mix_equivalence(timm_convnext(), "stages.3")
    assert convnext.stop == "head.norm" and not convnext.same_as_output
    assert convnext.describe() == "≡ head.norm input"


class _Head(nn.Module):
    """A custom head: mean over H and W, a constant scale (or a square), flatten, dropout, a linear layer."""

    def __init__(self, p: float, start_dim: int = 1, square: bool = False) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(p)
        self.fc = nn.Linear(4, 2)
        self.start_dim, self.square = start_dim, square

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x).mean(dim=(2, 3), keepdim=True)
        return self.fc(self.drop(torch.flatten(x * (x if self.square else 2.0), self.start_dim)))


@pytest.mark.parametrize(
    "head, fixed, stop, output",
    [
        (_Head(0.0), ("mean", "mul", "flatten", "drop"), "fc", True),
        (_Head(0.5), ("mean", "mul", "flatten"), "drop", False),  # each row has its own dropout mask
        (_Head(0.0, start_dim=0), ("mean", "mul"), "flatten in forward", False),  # flattening the batch axis mixes rows
        (_Head(0.0, square=True), ("mean",), "mul in forward", False),  # x * x is not linear in x
    ],
    ids=["dropout-0", "dropout-0.5", "flatten-batch", "square"],
)
def test_functional_ops_are_read_conservatively(head, fixed, stop, output) -> None:
    found = mix_equivalence(head, "body")
    assert (found.fixed_ops, found.stop, found.same_as_output) == (fixed, stop, output)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        return self.fc(x if x.sum() > 0 else -x)


def test_untraceable_models_and_non_cut_points_claim_nothing() -> None:
    assert mix_equivalence(_Untraceable(), "body") == MixEquivalence("body", known=False)
    assert mix_equivalence(_Untraceable(), "body").describe() == "?"
    assert same_mix_points(_Untraceable(), ["body", "output"]) == []
    inside = mix_equivalence(torchvision.models.resnet18(), "layer4.1.conv2")
    assert not inside.known and inside.describe() == "?"


def test_the_mixer_says_once_when_two_layers_are_one_point() -> None:
    model = tv_resnet18()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HookMixer(model, ["layer3", "layer4", "output"], num_classes=5).close()
        HookMixer(model, ["layer3", "layer4"], num_classes=5).close()
        HookMixer(model, ["layer4", "output"], alpha=0.0, cutmix_alpha=1.0, num_classes=5, layout="NCHW").close()
    same = [w for w in caught if issubclass(w.category, SameMixPointWarning)]
    assert len(same) == 1 and "'layer4' ≡ 'output'" in str(same[0].message) and "layer3" not in str(same[0].message)
    assert same[0].filename == __file__


def test_split_past_the_fixed_ops_caches_the_pooled_features() -> None:
    model = torchvision.models.resnet18(num_classes=5).eval()
    backbone, head = split(model, "layer4", past_fixed_ops=True)
    x = _data(64)[0]
    with torch.no_grad():
        features = backbone(x)
        assert features.shape == (B, 512)
        torch.testing.assert_close(head(features), model(x), rtol=0, atol=0)
    assert [name for name, _ in head.named_children()] == ["fc"]


class _Net(nn.Module):
    """A body (conv + ReLU: a (B, 4, 6, 6) map of non-negative values from 8×8 images), then ``tail(self, map)``
    gives the logits; ``parts`` are the modules, parameters and buffers (plain tensors) the tail reads."""

    def __init__(self, tail, fc: tuple[int, int] = (4, 5), **parts) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.fc = nn.Linear(*fc)
        self.tail = tail
        for name, part in parts.items():
            if isinstance(part, (nn.Module, nn.Parameter)):
                setattr(self, name, part)
            else:
                self.register_buffer(name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self, self.body(x))


def _pooled(f: torch.Tensor) -> torch.Tensor:
    return f.mean((2, 3))


def _pairs(reshape: str):
    """A batch of pairs: rows side by side two by two (B/2 rows of 8), fc to 10, then back to (B, 5) rows."""
    return lambda m, f: getattr(m.fc(getattr(_pooled(f), reshape)(-1, 8)), reshape)(f.size(0), -1)


class _PairsByAnotherSize(_Net):
    """Pairs of rows again, sized by the first size of a tensor off the chain: ``half.size(0)`` is B/2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x)
        half = torch.zeros(f.size(0) // 2)
        return self.fc(_pooled(f).reshape(half.size(0), -1)).reshape(f.size(0), -1)


@timm.layers.register_notrace_module  # kept whole by the tracer, so the graph shows one call of it
class _SquaredLinear(nn.Linear):
    """A subclass of ``nn.Linear`` whose forward is not affine: only exact types are read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) ** 2


class _TanhTimes(nn.Module):
    def forward(self, x: torch.Tensor, n: int = 1) -> torch.Tensor:
        return torch.tanh(x) * n


# (factory, point, claimed): the analysis must claim "mixing body ≡ mixing at point" exactly when ``claimed``.
_RULE_CASES = {
    # an argument that changes an op's meaning (floor division is not a scaling)
    "div-rounding-mode": (
        lambda: _Net(lambda m, f: m.fc(torch.div(_pooled(f), 0.01, rounding_mode="floor"))),
        "output",
        False,
    ),
    # only exact module types are read: a subclass may override forward
    "linear-subclass": (
        lambda: _Net(lambda m, f: m.fc(m.lin(f.flatten(1))), lin=_SquaredLinear(144, 4)),
        "output",
        False,
    ),
    # reads outside autograd are uses: mixing body changes them, mixing the fc input does not
    "data-read": (
        lambda: _Net(lambda m, f: m.fc(_pooled(f)) * _pooled(f.data).mean(1, keepdim=True)),
        "fc input",
        False,
    ),
    "detach-read": (
        lambda: _Net(lambda m, f: m.fc(_pooled(f)) * _pooled(f.detach()).mean(1, keepdim=True)),
        "fc input",
        False,
    ),
    "x-over-width": (lambda: _Net(lambda m, f: m.fc(f.sum((2, 3)) / f.shape[-1])), "output", True),  # a shape read
    # a constant that could line up with the batch axis scales each row by its own factor
    "per-row-buffer": (lambda: _Net(lambda m, f: m.fc(_pooled(f) * m.w), w=torch.rand(B, 1) + 0.5), "output", False),
    "one-element-parameter": (
        lambda: _Net(lambda m, f: m.fc(_pooled(f) * m.s + 1.0), s=nn.Parameter(torch.tensor([0.5]))),
        "output",
        True,
    ),
    # x / c is a scaling, c / x is not linear
    "c-over-x": (lambda: _Net(lambda m, f: m.fc(1.0 / (_pooled(f) + 0.1))), "output", False),
    "x-over-c": (lambda: _Net(lambda m, f: m.fc(_pooled(f) / 4.0)), "output", True),
    # a LayerNorm module normalises each row by its own statistics; mixing its input is still equivalent
    "layer-norm": (lambda: _Net(lambda m, f: m.fc(m.norm(_pooled(f))), norm=nn.LayerNorm(4)), "output", False),
    "layer-norm-input": (lambda: _Net(lambda m, f: m.fc(m.norm(_pooled(f))), norm=nn.LayerNorm(4)), "norm input", True),
    # reshape / view / permute / indexing that move the batch axis or reorder rows mix rows; keeping it does not
    "reshape-pairs": (lambda: _Net(_pairs("reshape"), fc=(8, 10)), "output", False),
    "view-pairs": (lambda: _Net(_pairs("view"), fc=(8, 10)), "output", False),
    "reshape-by-another-size": (lambda: _PairsByAnotherSize(None, fc=(8, 10)), "output", False),
    "view-keeps-batch": (
        lambda: _Net(lambda m, f: m.fc(F.adaptive_avg_pool2d(f, 1).view(f.size(0), -1))),
        "fc input",
        True,
    ),
    "permute-batch": (
        lambda: _Net(lambda m, f: m.fc(F.avg_pool1d(_pooled(f).permute(1, 0), 3, 1, 1).permute(1, 0))),
        "output",
        False,
    ),
    "permute-keeps-batch": (lambda: _Net(lambda m, f: m.fc(f.permute(0, 2, 3, 1).mean((1, 2)))), "output", True),
    "rows-reordered": (lambda: _Net(lambda m, f: m.fc(_pooled(f)[[5, 0, 1, 2, 3, 4]])), "output", False),
    # indexing that keeps every row, with a tuple index or a plain slice
    "channels-selected": (lambda: _Net(lambda m, f: m.fc(_pooled(f[:, :3])), fc=(3, 5)), "output", True),
    "whole-slice": (lambda: _Net(lambda m, f: m.fc(_pooled(f)[:])), "output", True),
    # the batch size read as shape[0] (not size(0)); a division by a one-element parameter is a scaling
    "reshape-by-shape0": (
        lambda: _Net(lambda m, f: m.fc(F.adaptive_avg_pool2d(f, 1).reshape(f.shape[0], -1))),
        "fc input",
        True,
    ),
    "reshape-by-a-buffer-count": (
        lambda: _Net(
            lambda m, f: m.fc(_pooled(f).reshape(m.pairs.numel(), 8)).reshape(f.size(0), -1),
            fc=(8, 10),
            pairs=torch.zeros(B // 2),
        ),
        "output",
        False,
    ),
    "per-row-factor-made-in-forward": (
        lambda: _Net(lambda m, f: m.fc(_pooled(f) * torch.linspace(0.5, 1.5, B)[:, None])),
        "output",
        False,
    ),
    "flatten-module": (
        lambda: _Net(lambda m, f: m.fc(m.flat(F.adaptive_avg_pool2d(f, 1))), flat=nn.Flatten()),
        "output",
        True,
    ),
    "parameter-times-x": (
        lambda: _Net(lambda m, f: m.fc(torch.mul(m.s, _pooled(f))), s=nn.Parameter(torch.tensor([0.5]))),
        "output",
        True,
    ),
    "x-over-one-element-parameter": (
        lambda: _Net(lambda m, f: m.fc(_pooled(f) / m.s), s=nn.Parameter(torch.tensor([2.0]))),
        "output",
        True,
    ),
    # transpose / unsqueeze / squeeze keep the rows unless they touch axis 0
    "transpose-keeps-batch": (lambda: _Net(lambda m, f: m.fc(f.flatten(2).transpose(1, 2).mean(1))), "output", True),
    "transpose-batch": (
        lambda: _Net(lambda m, f: m.fc(F.avg_pool1d(_pooled(f).transpose(0, 1), 3, 1, 1).transpose(0, 1))),
        "output",
        False,
    ),
    "unsqueeze-squeeze": (lambda: _Net(lambda m, f: m.fc(_pooled(f).unsqueeze(2).squeeze(2))), "output", True),
    "unsqueeze-batch": (
        lambda: _Net(lambda m, f: m.fc(F.avg_pool2d(_pooled(f).unsqueeze(0), (3, 1), 1, (1, 0)).squeeze(0))),
        "output",
        False,
    ),
    # the train graph is read: a tanh only in train mode ends the chain though the eval graph is linear
    "nonlinear-only-in-train": (
        lambda: _Net(lambda m, f: m.fc(torch.tanh(_pooled(f)) if m.training else _pooled(f))),
        "output",
        False,
    ),
    # a submodule named "output" is not the model's output
    "module-named-output": (
        lambda: _Net(lambda m, f: torch.tanh(m.output(_pooled(f))), output=nn.Linear(4, 5)),
        "output",
        False,
    ),
    # a module whose input is a fixed-chain tensor and a shape read is named (its input is equivalent)
    "module-reading-a-shape": (
        lambda: _Net(lambda m, f: m.fc(m.scale(_pooled(f), f.size(1))), scale=_TanhTimes()),
        "scale input",
        True,
    ),
    "reshape-by-size-tuple": (
        lambda: _Net(lambda m, f: m.fc(F.adaptive_avg_pool2d(f, 1).reshape(f.size()[0], -1))),
        "fc input",
        True,
    ),
    # F.linear with parameters is affine per row, with or without a bias; a (B, 5) bias shifts each row its own way
    "functional-linear": (lambda: _Net(lambda m, f: F.linear(_pooled(f), m.fc.weight, m.fc.bias)), "output", True),
    "functional-linear-no-bias": (lambda: _Net(lambda m, f: F.linear(_pooled(f), m.fc.weight)), "output", True),
    "functional-linear-per-row-bias": (
        lambda: _Net(lambda m, f: F.linear(_pooled(f), m.fc.weight, m.b), b=nn.Parameter(torch.randn(B, 5))),
        "output",
        False,
    ),
    # permute's dims given as one tuple read like dims given one by one; one size read as the shape
    "permute-as-one-tuple": (lambda: _Net(lambda m, f: m.fc(f.permute((0, 2, 3, 1)).mean((1, 2)))), "output", True),
    "reshape-to-one-size": (
        lambda: _Net(lambda m, f: m.fc(_pooled(f).sum(1, keepdim=True).reshape(f.size(0)).unsqueeze(1)), fc=(1, 5)),
        "output",
        True,
    ),
    # pairs or triples of rows again, sized by shape[0] of a tensor off the chain, or by a shape read that is no
    # size (g.dim() is 2: B/2 = 3 rows side by side)
    "reshape-by-another-shape0": (
        lambda: _Net(
            lambda m, f: m.fc(_pooled(f).reshape(torch.zeros(f.size(0) // 2).shape[0], -1)).reshape(f.size(0), -1),
            fc=(8, 10),
        ),
        "output",
        False,
    ),
    "reshape-by-a-dim-count": (
        lambda: _Net(
            lambda m, f: (lambda g: m.fc(g.reshape(g.dim(), -1)).reshape(f.size(0), -1))(_pooled(f)), fc=(12, 15)
        ),
        "output",
        False,
    ),
    # a 1-D buffer of B elements times a (B,) tensor of the chain: each row its own factor
    "per-row-vector-buffer": (
        lambda: _Net(lambda m, f: m.fc((_pooled(f).sum(1) * m.w).unsqueeze(1)), fc=(1, 5), w=torch.rand(B) + 0.5),
        "output",
        False,
    ),
    # a (1, 1) parameter has one element, yet times a (B,) tensor it makes a (1, B) one: the rows move to axis 1,
    # where a pooling averages them
    "broadcast-by-a-1x1-parameter": (
        lambda: _Net(
            lambda m, f: m.fc(F.avg_pool1d(_pooled(f).sum(1) * m.s, 3, 1, 1).reshape(f.size(0), 1)),
            fc=(1, 5),
            s=nn.Parameter(torch.full((1, 1), 0.5)),
        ),
        "output",
        False,
    ),
    # nn.Flatten(0) folds the batch axis: a Linear over the folded (B * 4,) vector reads every row at once
    "flatten-module-batch": (
        lambda: _Net(
            lambda m, f: m.fc(m.flat(_pooled(f))).reshape(f.size(0), -1), fc=(4 * B, 5 * B), flat=nn.Flatten(0)
        ),
        "output",
        False,
    ),
    # a dim read in forward (a scalar parameter's dim() is 0: the batch axis) is not a literal: not read
    "transpose-by-a-dim-read": (
        lambda: _Net(
            lambda m, f: m.fc(F.avg_pool1d(_pooled(f).transpose(m.s.dim(), 1), 3, 1, 1).transpose(0, 1)),
            s=nn.Parameter(torch.tensor(1.0)),
        ),
        "output",
        False,
    ),
}


@pytest.mark.parametrize("case", list(_RULE_CASES))
def test_each_rule_of_the_analysis_holds_in_gradients(case: str) -> None:
    factory, point, claimed = _RULE_CASES[case]
    model = _seeded(factory)
    claim = "≡ output" if point == "output" else f"≡ {point}"
    assert (claim in mix_equivalence(model, "body").describe()) == claimed, mix_equivalence(model, "body")
    if point == "output":
        assert (("body", "output") in same_mix_points(model, ["body", "output"])) == claimed
    x, y = _data(8)
    hooked, lam, partners = mixed_by_hookmix(model, "body", x, y)
    by_hand = mixed_by_hand(model, point, lam, partners, x, y)
    error = ((hooked - by_hand).norm() / by_hand.norm()).item()
    if claimed:
        assert error < 1e-5, error
    else:
        assert error > 1e-3, error  # the claim would have been false


def test_a_module_called_with_its_input_as_a_keyword_is_not_read() -> None:
    """``self.fc(input=g)``: a module call the rules do not read (a positional input only) ends the chain, with no
    error; the fixed ops before it still count."""
    found = mix_equivalence(_seeded(_Net, lambda m, f: m.fc(input=_pooled(f))), "body")
    assert found == MixEquivalence("body", True, ("mean",), "fc", False)


def test_a_sum_over_the_batch_axis_ends_the_chain() -> None:
    """``g.sum(0)`` adds the rows together: not a fixed op (it would be cached past by ``split``)."""
    found = mix_equivalence(_seeded(_Net, lambda m, f: m.fc(_pooled(f).sum(0, keepdim=True).expand(B, -1))), "body")
    assert (found.fixed_ops, found.stop) == (("mean",), "sum in forward")


def test_a_slice_that_drops_rows_ends_the_chain() -> None:
    """``g[1:]`` drops the first row (the rows no longer line up with the batch): not read as fixed."""
    found = mix_equivalence(_seeded(_Net, lambda m, f: m.fc(_pooled(f)[1:])), "body")
    assert (found.fixed_ops, found.stop, found.same_as_output) == (("mean",), "getitem in forward", False)


def _flat_pool(end_dim: Callable[[nn.Module], int]):
    """Adaptive pooling to (B, 4, 1, 1), then ``torch.flatten`` called with keywords only."""
    return lambda m, f: m.fc(torch.flatten(input=F.adaptive_avg_pool2d(f, 1), start_dim=1, end_dim=end_dim(m)))


@pytest.mark.parametrize(
    "factory, fixed",
    [
        (lambda: _Net(lambda m, f: m.fc(_pooled(f) * (2.0 if m.training else 3.0))), ("mean",)),
        (lambda: _Net(lambda m, f: m.fc(_pooled(f) if m.training else f.sum((2, 3)))), ()),
        (lambda: _Net(lambda m, f: m.fc(_pooled(f) * (2.0 if m.training else f.size(1)))), ("mean",)),
        (lambda: _Net(_flat_pool(lambda m: -1)), ("adaptive_avg_pool2d", "flatten")),
        (lambda: _Net(_flat_pool(lambda m: -1 if m.training else 3)), ("adaptive_avg_pool2d",)),
        (lambda: _Net(lambda m, f: m.fc(_pooled(f[:, 1 : f.size(1)])), fc=(3, 5)), ("getitem", "mean")),
        (lambda: _Net(lambda m, f: m.fc(_pooled(f[:, :3] if m.training else f[:, [0, 1, 2]])), fc=(3, 5)), ()),
    ],
    ids=[
        "second-op-differs",
        "first-op-differs",
        "number-or-shape-read",
        "same-keywords",
        "keyword-value-differs",
        "same-slice-by-a-size",
        "slice-or-list",
    ],
)
def test_ops_that_differ_between_train_and_eval_are_not_cached_past(factory, fixed) -> None:
    """Train and eval graphs are matched node by node: keyword arguments, slices (with a shape read in them)
    and constants count; a number and a shape read differ."""
    model = _seeded(factory)
    assert mix_equivalence(model, "body").fixed_ops == fixed
    backbone, head = split(model, "body", past_fixed_ops=True)
    x, y = _data(8)
    with torch.no_grad():
        cached = backbone.eval()(x)  # a head-only job extracts in eval mode and trains the head in train mode
    hooked, lam, partners = mixed_by_hookmix(model.train(), "body", x, y)
    model.zero_grad()
    out = head.train()(lam * cached + (1 - lam) * cached[partners])
    (lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[partners])).backward()
    by_hand = torch.cat([model.fc.weight.grad.flatten(), model.fc.bias.grad])
    torch.testing.assert_close(by_hand, hooked[-by_hand.numel() :], rtol=1e-5, atol=1e-7)  # fc's come last


@pytest.mark.parametrize("case", ["data-read", "detach-read"])
def test_a_split_past_the_fixed_ops_keeps_reads_outside_autograd(case: str) -> None:
    model = _seeded(_RULE_CASES[case][0])
    backbone, head = split(model, "body", past_fixed_ops=True)
    x = _data(8)[0]
    with torch.no_grad():
        torch.testing.assert_close(head(backbone(x)), model(x), rtol=0, atol=0)


class _Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(_pooled(self.body(x)) * 2.0)


class _Outer(nn.Module):
    """``trunk.body``'s fixed chain ends at a tanh inside ``trunk``, whose own input is the image."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _Trunk()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(x))


def test_the_display_never_names_an_enclosing_modules_input() -> None:
    model = _seeded(_Outer)
    rows = {r.name: r.same_as for r in list_layers(model, torch.zeros(1, 3, 8, 8))}
    assert rows["trunk.body"] == "≡ input of tanh in trunk"
    x, y = _data(8)
    hooked, lam, partners = mixed_by_hookmix(model, "trunk.body", x, y)
    by_hand = mixed_by_hand(model, "trunk input", lam, partners, x, y)
    assert ((hooked - by_hand).norm() / by_hand.norm()).item() > 1e-3  # "≡ trunk input" would be false


def test_a_hooked_module_is_not_read() -> None:
    model = _seeded(_Net, lambda m, f: m.fc(m.pool(f).flatten(1)), pool=nn.AdaptiveAvgPool2d(1))
    assert mix_equivalence(model, "body").describe() == "≡ fc input, ≡ output"
    model.pool.register_forward_hook(lambda m, a, o: o**2)  # the graph shows one call of pool, not the square
    assert mix_equivalence(model, "body").describe() == ""
    x, y = _data(8)
    hooked, lam, partners = mixed_by_hookmix(model, "body", x, y)
    by_hand = mixed_by_hand(model, "fc input", lam, partners, x, y)
    assert ((hooked - by_hand).norm() / by_hand.norm()).item() > 1e-3  # "≡ fc input" would be false


def test_an_eval_graph_that_cannot_be_traced_shares_no_fixed_op() -> None:
    """Features cached in eval mode past ``mean`` are unproven when the eval graph cannot be read: the fixed
    chain is empty (the train graph's ``mean`` counts as affine, so mixing body is still logit mixup)."""
    model = _seeded(_Net, lambda m, f: m.fc(_pooled(f) if m.training or f.sum() > 0 else -_pooled(f)))
    assert mix_equivalence(model, "body") == MixEquivalence("body", True, (), "mean in forward", True)


def test_a_value_used_twice_claims_nothing_past_it() -> None:
    found = mix_equivalence(_seeded(_RULE_CASES["data-read"][0]), "body")
    assert found == MixEquivalence("body", True, (), None, False) and found.same_as_output is False


def test_fixed_ops_up_to_the_output_make_the_layer_the_output() -> None:
    """No affine op after the fixed ones: the stop is the output, shown as "≡ output" (not the last op's output)."""
    model = _seeded(_Net, lambda m, f: F.adaptive_avg_pool2d(F.adaptive_avg_pool2d(f, 4), 2).flatten(1))  # (B, 16)
    found = mix_equivalence(model, "body")
    ops = ("adaptive_avg_pool2d", "adaptive_avg_pool2d", "flatten")  # the function's name, not the node's
    assert found == MixEquivalence("body", True, ops, "output", True)
    assert found.describe() == "≡ output"
    x, y = _data(8)
    hooked, lam, partners = mixed_by_hookmix(model, "body", x, y)
    by_hand = mixed_by_hand(model, "output", lam, partners, x, y)
    assert ((hooked - by_hand).norm() / by_hand.norm()).item() < 1e-5


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + z


@pytest.mark.parametrize(
    "factory, expected",
    [
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), MixEquivalence("input", True, ("0",), "1", True)),
        (
            lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 5)),
            MixEquivalence("input", True, ("0",), "1", False),
        ),
    ],
    ids=["linear-head", "mlp-head"],
)
def test_the_input_of_a_head_is_analysed(factory, expected: MixEquivalence) -> None:
    """``"input"`` is the model's single input: a linear head's input is its output, an MLP's is not (checked
    by mixing a (B, 3, 2, 2) batch before and after the head)."""
    head = _seeded(factory)
    assert mix_equivalence(head, "input") == expected
    x, lam, partners = _data(2)[0], 0.3, torch.tensor([5, 0, 1, 2, 3, 4])
    with torch.no_grad():
        mixed_input, mixed_output = (
            head(lam * x + (1 - lam) * x[partners]),
            lam * head(x) + (1 - lam) * head(x)[partners],
        )
    error = ((mixed_input - mixed_output).norm() / mixed_output.norm()).item()
    assert error < 1e-5 if expected.same_as_output else error > 1e-3, error


def test_a_model_with_two_inputs_has_no_input_point() -> None:
    assert mix_equivalence(_TwoInputs(), "input") == MixEquivalence("input", known=False)


def test_a_fixed_op_whose_output_is_used_twice_is_the_point() -> None:
    model = _seeded(
        _Net, lambda m, f: (lambda p: m.fc(p.flatten(1)) + p.mean())(m.pool(f)), pool=nn.AdaptiveAvgPool2d(1)
    )
    found = mix_equivalence(model, "body")
    assert found == MixEquivalence("body", True, ("pool",), None, False) and found.describe() == "≡ pool output"
    x, y = _data(8)
    hooked, lam, partners = mixed_by_hookmix(model, "body", x, y)
    by_hand = mixed_by_hand(model, "pool", lam, partners, x, y)
    assert ((hooked - by_hand).norm() / by_hand.norm()).item() < 1e-5


class _Tanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


def test_the_stop_names_a_module_fed_by_the_layer_alone() -> None:
    found = mix_equivalence(_seeded(_Net, lambda m, f: m.fc(_pooled(m.gate(f))), gate=_Tanh()), "body")
    assert found == MixEquivalence("body", True, (), "gate", False)


def test_a_module_called_twice_is_not_named() -> None:
    """``gate`` runs twice: "≡ gate input" would mix the input of both calls."""
    model = _seeded(_Net, lambda m, f: m.fc(m.gate(m.gate(_pooled(f)))), gate=_Tanh())
    assert mix_equivalence(model, "body").describe() == "≡ input of tanh in gate"
    x, y = _data(8)
    hooked, lam, partners = mixed_by_hookmix(model, "body", x, y)
    by_hand = mixed_by_hand(model, "gate input", lam, partners, x, y)
    assert ((hooked - by_hand).norm() / by_hand.norm()).item() > 1e-3


def test_the_warning_names_each_pair_of_same_points() -> None:
    """Called directly (the mixer's call is checked by ``test_the_mixer_says_once_when_two_layers_are_one_point``)."""
    model = tv_resnet18()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_same_mix_points(model, ["layer3", "layer4", "avgpool", "output"], stacklevel=1)
        warn_same_mix_points(model, ["layer3", "layer4"], stacklevel=1)
    assert [w.category for w in caught] == [SameMixPointWarning]
    assert caught[0].filename != equivalence.__file__  # it points at a caller, never at the warn() line
    assert str(caught[0].message) == (
        "layers 'layer4' ≡ 'avgpool'; 'layer4' ≡ 'output'; 'avgpool' ≡ 'output': only linear ops separate them, "
        "so mixup at one is exactly mixup at the other "
        "(W·(λa+(1−λ)b)+c = λ(W·a+c)+(1−λ)(W·b+c)); as separate arms they are one experiment. Keep one of "
        "each pair (CutMix, which pastes boxes of a map, does differ)."
    )
