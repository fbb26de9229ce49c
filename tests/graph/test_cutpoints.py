"""Cut points (output dominators in the fx graph), stage names and the mix-point warnings.

Bugs a maintainer could plausibly make in the trace's handling of warnings, and the test that catches each:

* letting torch's reentrant-checkpoint warning ("None of the inputs have requires_grad=True", raised because
  the trace passes fx Proxies) out of the trace, so `python -W error` makes the model untraceable:
  ``test_a_reentrant_checkpoint_is_traced_under_warnings_as_errors``;
* silencing every warning during the trace (the model's own too), or installing the filter for good rather
  than for the trace: ``test_the_trace_hides_only_its_own_checkpoint_warning``.
"""

from __future__ import annotations

import functools
import gc
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

from hookmix.app.digits import DigitsCNN
from hookmix.graph.cutpoints import CutPointWarning, cut_points, stage_names
from hookmix.graph.layers import check_mix_points, resolve_layers
from tests.conftest import TabularMLP


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    stages: list[str]
    other_cuts: tuple[str, ...]
    mid_residual: tuple[str, ...]


def _numbered(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


RESNET_STAGES = ["layer1", "layer2", "layer3", "layer4"]
DENSENET_STAGES = [
    "features.denseblock1",
    "features.transition1",
    "features.denseblock2",
    "features.transition2",
    "features.denseblock3",
    "features.transition3",
    "features.denseblock4",
]
CASES: dict[str, Case] = {
    "tv_resnet18": Case(
        lambda: torchvision.models.resnet18(num_classes=10),
        RESNET_STAGES,
        ("maxpool", "layer3.1", "fc"),
        ("layer4.0.conv2", "layer4.0.bn2", "layer4.0.downsample", "layer1.0.conv1"),
    ),
    "tv_resnet50": Case(
        lambda: torchvision.models.resnet50(num_classes=10),
        RESNET_STAGES,
        ("layer3.5", "avgpool"),
        ("layer4.0.conv2", "layer3.5.bn3"),
    ),
    "tv_mobilenet_v3_small": Case(
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
        _numbered("features.", 13),
        ("features.4.block",),  # 24 -> 40 channels, stride 2: no skip connection
        ("features.5.block", "features.5.block.2"),
    ),
    "tv_convnext_tiny": Case(
        lambda: torchvision.models.convnext_tiny(num_classes=10),
        _numbered("features.", 8),
        ("features.5.3",),
        ("features.1.0.block", "features.5.3.block.3", "features.5.3.stochastic_depth"),
    ),
    "tv_densenet121": Case(
        lambda: torchvision.models.densenet121(num_classes=10),
        DENSENET_STAGES,
        ("features.norm5",),
        ("features.denseblock2.denselayer3", "features.denseblock2.denselayer3.conv2"),
    ),
    "timm_resnet18": Case(
        lambda: timm.create_model("resnet18", num_classes=10),
        RESNET_STAGES,
        ("act1", "layer2.1"),
        ("layer4.0.conv2", "layer2.1.act1"),
    ),
    "timm_convnext_atto": Case(
        lambda: timm.create_model("convnext_atto", num_classes=10),
        _numbered("stages.", 4),
        ("stages.1.blocks.0", "stages.1.downsample"),
        ("stages.1.blocks.0.conv_dw", "stages.1.blocks.0.mlp"),
    ),
    "timm_efficientnet_b0": Case(
        lambda: timm.create_model("efficientnet_b0", num_classes=10),
        ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"],
        ("blocks.1.1", "conv_head"),
        ("blocks.1.1.conv_pw", "blocks.4.2.se"),
    ),
    "timm_vit_tiny": Case(
        lambda: timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8),
        _numbered("blocks.", 12),
        ("blocks.3", "norm"),
        ("blocks.3.attn", "blocks.3.mlp", "blocks.3.norm1"),
    ),
}


@functools.cache
def _model(name: str) -> nn.Module:
    """One random-init instance per case, shared by the tests of this module (they do not modify it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CASES[name].build()


@pytest.mark.parametrize("name", list(CASES))
def test_stages_and_blocks_are_cut_points_mid_residual_modules_are_not(name: str) -> None:
    case, model = CASES[name], _model(name)
    points = cut_points(model)
    assert resolve_layers(model, "stages") == case.stages
    for layer in (*case.stages, *case.other_cuts):
        assert points.is_cut_point(layer) and points.why_not(layer) is None, layer
    for layer in case.mid_residual:
        reason = points.why_not(layer)
        assert not points.is_cut_point(layer)
        assert reason is not None and reason.startswith("is bypassed by a skip connection or parallel branch"), layer


@pytest.mark.parametrize(
    ("name", "layer", "reason", "nearest"),
    [
        (
            "tv_resnet18",
            "layer4.0.conv2",
            "the output of layer4.0.downsample reaches the add in layer4.0",
            ("layer3", "layer4.0"),
        ),
        (
            "tv_resnet18",
            "layer4.1.conv2",
            "the output of layer4.0 reaches the add in layer4.1",
            ("layer4.0", "layer4.1"),
        ),
        (
            "timm_vit_tiny",
            "blocks.3.attn",
            "the output of blocks.2 reaches the add in blocks.3",
            ("blocks.2", "blocks.3"),
        ),
        (
            "tv_densenet121",
            "features.denseblock2.denselayer3",
            "the output of features.transition1 and the output of features.denseblock2.denselayer1 reach the cat in "
            "features.denseblock2.denselayer4",
            ("features.transition1", "features.denseblock2"),
        ),
    ],
)
def test_bypassing_path_and_nearest_cut_points_are_named(
    name: str, layer: str, reason: str, nearest: tuple[str, str]
) -> None:
    points = cut_points(_model(name))
    assert points.why_not(layer) == (
        f"is bypassed by a skip connection or parallel branch: {reason} without passing through it"
    )
    assert points.nearest(layer) == nearest


def test_module_inside_a_leaf_is_placed_at_the_leaf() -> None:
    # timm keeps BatchNormAct2d whole, so its `act` never appears in the traced graph.
    points = cut_points(_model("timm_efficientnet_b0"))
    assert points.why_not("bn1.act").startswith("is not reached by the traced forward")
    assert points.suggestion("bn1.act") == "nearest cut points: conv_stem (before it), bn1 (after it)"


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x * 2


class _Diamond(nn.Module):
    """``a`` -> (``b`` | ``c``) -> add -> ``d``, with a dead ``probe``, a tuple-returning ``pair``,
    a module ``never`` called and a parameter read after the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.probe, self.never = (nn.Linear(4, 4) for _ in range(5))
        self.pair = _Pair()
        self.d = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        self.probe(h)
        p, q = self.pair(h)
        return self.d((self.b(p) + self.c(q)) * self.scale.exp())


def test_dominators_of_a_diamond_and_every_reason() -> None:
    points = cut_points(_Diamond())
    assert points.names == ("a", "d")  # parameters (`scale.exp()`) are not a path from the input
    assert points.why_not("b") == (
        "is bypassed by a skip connection or parallel branch: the output of c reaches the add in the model's "
        "forward without passing through it"
    )
    assert points.why_not("probe") == "has an output that the model's output does not depend on"
    assert points.why_not("pair") == "returns tuple, not a tensor"
    assert points.why_not("never").startswith("is not reached by the traced forward")
    assert points.suggestion("b") == "nearest cut points: a (before it), d (after it)"
    assert points.suggestion("never") == "cut points: a, d"


def test_every_input_counts_and_stages_fall_back_to_one_block() -> None:
    model = TabularMLP()
    points = cut_points(model)
    assert points.names == ("body.0", "body", "body.1", "head")
    assert points.why_not("cont") == (
        "is bypassed by a skip connection or parallel branch: the output of embeds.0 and the output of embeds.1 "
        "reach the cat in the model's forward without passing through it"
    )
    assert stage_names(model) == ["body"]  # the only block: `head` is a single layer


def test_layers_mixed_together_are_judged_together() -> None:
    model = TabularMLP()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_mix_points(model, ["embeds.*", "cont"], mode="all")  # together they cut every path
        check_mix_points(model, ["embeds.0", "input"], mode="all")  # the input is always sound
    with pytest.warns(CutPointWarning) as together:
        check_mix_points(model, ["embeds.0", "cont"], mode="all")  # embeds.1 leaves a path open
    with pytest.warns(CutPointWarning) as one_per_step:
        check_mix_points(model, ["embeds.*", "cont"])
    assert [str(w.message).split(":")[0] for w in together] == [
        "layer 'embeds.0' is not a cut point of TabularMLP",
        "layer 'cont' is not a cut point of TabularMLP",
    ]
    assert len(one_per_step) == 3
    with pytest.raises(ValueError, match="mode='both' must be 'one'"):
        check_mix_points(model, "cont", mode="both")


def test_stages_of_a_plain_model_leave_out_the_classifier() -> None:
    assert stage_names(DigitsCNN()) == ["stem", "stage1", "stage2"]  # `head` produces the output


def test_stages_resolve_inside_a_layer_list_in_order() -> None:
    model = _model("tv_resnet18")
    assert resolve_layers(model, ["input", "stages", "layer2"]) == ["input", *RESNET_STAGES]


def test_warning_fires_exactly_for_non_cut_points() -> None:
    model = _model("tv_resnet18")
    with pytest.warns(CutPointWarning) as record:
        check_mix_points(model, ["input", "layer3", "layer4.0.conv2", "fc", "layer4.0.relu", "output"])
    assert len(record) == 2 and all(w.filename == __file__ for w in record)
    assert str(record[0].message) == (
        "layer 'layer4.0.conv2' is not a cut point of ResNet: it is bypassed by a skip connection or parallel "
        "branch: the output of layer4.0.downsample reaches the add in layer4.0 without passing through it, so mixing "
        "there may leave part of what the rest of the network sees unmixed; nearest cut points: layer3 (before "
        "it), layer4.0 (after it) ('input' and 'output' are always sound). Pass strict=True to make this an error."
    )
    assert str(record[1].message).startswith(
        "layer 'layer4.0.relu' is not a cut point of ResNet: it is called 2 times by forward"
    )


def test_cut_points_and_stages_do_not_warn() -> None:
    model = _model("timm_vit_tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_mix_points(model, "stages")
        check_mix_points(model, ["input", "blocks.*", "norm", "output"], strict=True)


def test_strict_refuses_every_non_cut_point_at_once() -> None:
    with pytest.raises(ValueError) as info:
        check_mix_points(_model("timm_convnext_atto"), ["stages.1.blocks.0.mlp", "stages.2", "output"], strict=True)
    message = str(info.value)
    assert message.count("is not a cut point") == 1 and "'stages.1.blocks.0.mlp'" in message
    assert "nearest cut points: stages.1.downsample (before it), stages.1.blocks.0 (after it)" in message
    assert message.endswith("Choose cut points, or pass strict=False to mix there anyway.")
    with pytest.raises(TypeError, match="strict must be True or False, got str 'yes'"):
        check_mix_points(_model("timm_convnext_atto"), "stages.2", strict="yes")  # type: ignore[arg-type]


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.out(-x if x.sum() > 0 else x)


def test_untraceable_model_gets_one_note_and_falls_back() -> None:
    model = _DataDependent()
    with pytest.warns(CutPointWarning) as record:
        check_mix_points(model, ["input", "stem", "out"])
    assert len(record) == 1
    assert str(record[0].message) == (
        "cut-point analysis of ['stem', 'out'] not possible: cannot trace _DataDependent with torch.fx (TraceError: "
        "symbolically traced variables cannot be used as inputs to control flow). This usually means Python control "
        "flow on tensor values (e.g. `if x.sum() > 0:`) in forward. The layers are used as named, unchecked."
    )
    with pytest.raises(ValueError, match=r"strict=True needs the cut-point analysis of \['stem'\]"):
        check_mix_points(model, "stem", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_mix_points(model, ["input", "output"], strict=True)  # always sound: no analysis needed
    with pytest.raises(ValueError, match=r"layers='stages' needs timm's feature_info or the cut-point analysis"):
        resolve_layers(model, "stages")


class _SkipWhenTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.mid = nn.Linear(4, 4), nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        y = self.mid(h)
        return self.out(y + h if self.training else y)


def test_cached_per_model_and_mode_until_modules_change_and_never_keeps_the_model_alive() -> None:
    model = _SkipWhenTraining().eval()
    train, evaluation = cut_points(model, training=True), cut_points(model, training=False)
    assert not model.training  # tracing in train mode left the model's mode alone
    assert train.names == ("stem", "out") and evaluation.names == ("stem", "mid", "out")
    assert cut_points(model, training=True) is train
    model.mid = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    changed = cut_points(model, training=False)
    assert changed is not evaluation and changed.names == ("stem", "mid.0", "mid", "mid.1", "out")
    reference = weakref.ref(model)
    del model, train, evaluation, changed
    gc.collect()
    assert reference() is None


def test_a_trace_made_while_a_hook_was_attached_is_not_served_after_it_is_removed() -> None:
    """The trace runs through forward hooks (their ops are in the graph): the cache is keyed on them too, so
    an analysis made while a recording hook was attached (its ``detach`` a second use of the output: no claim)
    is not served once the hook is gone. Seen before the fix: the claim stayed lost for the model's life."""
    from hookmix.graph.equivalence import mix_equivalence

    model = torchvision.models.resnet18(num_classes=4)
    seen: dict[str, torch.Tensor] = {}
    handle = model.layer4.register_forward_hook(lambda module, args, out: seen.update(out=out.detach()))
    assert mix_equivalence(model, "layer4").describe() == ""
    handle.remove()
    assert mix_equivalence(model, "layer4").describe() == "≡ fc input, ≡ output"


class _ReentrantCheckpointed(nn.Module):
    """stem -> body (under a reentrant checkpoint) -> out; forward warns ``note`` when one is given (the
    model's own warning, which the trace must not hide)."""

    def __init__(self, note: str | None = None) -> None:
        super().__init__()
        self.note = note
        self.stem, self.out = nn.Linear(4, 4), nn.Linear(4, 2)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.note is not None:
            warnings.warn(self.note, UserWarning)
        return self.out(checkpoint(self.body, self.stem(x), use_reentrant=True))


def test_a_reentrant_checkpoint_is_traced_under_warnings_as_errors() -> None:
    """The trace hands the checkpoint fx Proxies, not tensors, so torch warns "None of the inputs have
    requires_grad=True" inside every trace; under ``python -W error`` that made the model untraceable."""
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        points = cut_points(_ReentrantCheckpointed(), training=True)
        assert warnings.filters[0][0] == "error" and len(warnings.filters) == len(filters) + 1  # left as it was
    assert points.names == ("stem", "body.0", "body", "body.1", "out")
    assert warnings.filters == filters


def test_the_trace_hides_only_its_own_checkpoint_warning() -> None:
    """The model's own warning raised while it is traced still reaches the user, and so does the checkpoint's
    warning when the user's own code calls it outside the trace."""
    model = _ReentrantCheckpointed(note="the model's own note")
    with warnings.catch_warnings(record=True) as during:
        warnings.simplefilter("always")
        cut_points(model, training=True)
    assert [str(w.message) for w in during] == ["the model's own note"]
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        checkpoint(model.body, torch.randn(2, 4), use_reentrant=True)
    assert [str(w.message) for w in after] == ["None of the inputs have requires_grad=True. Gradients will be None"]
