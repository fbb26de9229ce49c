"""split(): head(backbone(x)) == model(x) on torchvision / timm models, shared weights, clear refusals."""

from __future__ import annotations

import functools
from typing import Callable

import pytest
import timm
import torch
import torchvision
from torch import nn

from hookmix.graph.splitting import split

BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "tv_resnet18": lambda: torchvision.models.resnet18(weights=None),
    "tv_resnet50": lambda: torchvision.models.resnet50(weights=None),
    "tv_efficientnet_b0": lambda: torchvision.models.efficientnet_b0(weights=None),
    "tv_convnext_tiny": lambda: torchvision.models.convnext_tiny(weights=None),
    "timm_resnet18": lambda: timm.create_model("resnet18", pretrained=False),
    "timm_convnext_atto": lambda: timm.create_model("convnext_atto", pretrained=False),
    "timm_vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64),
}


def _build(name: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BUILDERS[name]()


@functools.cache
def _shared_eval_model(name: str) -> nn.Module:
    """One eval-mode instance per name, for tests that do not modify the model."""
    return _build(name).eval()


def _images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _layer_output_shape(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[int, ...]:
    shapes: list[tuple[int, ...]] = []
    module = model.get_submodule(layer)
    handle = module.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return shapes[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "layer", "shape"),
    [
        ("tv_resnet50", "layer4", (2, 2048, 2, 2)),
        ("tv_resnet50", "layer3", (2, 1024, 4, 4)),
        ("tv_efficientnet_b0", "features.7", (2, 320, 2, 2)),
        ("tv_convnext_tiny", "features.7", (2, 768, 2, 2)),
        ("timm_resnet18", "layer4", (2, 512, 2, 2)),
        ("timm_convnext_atto", "stages.3", (2, 320, 2, 2)),
        ("timm_vit_tiny", "blocks.5", (2, 17, 192)),
        ("timm_vit_tiny", "blocks.11", (2, 17, 192)),
    ],
)
def test_head_of_backbone_equals_model(name: str, layer: str, shape: tuple[int, ...]) -> None:
    model = _shared_eval_model(name)
    x = _images()
    backbone, head = split(model, layer)
    assert not backbone.training and not head.training
    with torch.no_grad():
        features = backbone(x)
        expected = model(x)
        out = head(features)
    assert tuple(features.shape) == shape == _layer_output_shape(model, layer, x)
    assert out.shape == expected.shape == (2, 1000)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # Both halves hold the model's own Parameter objects, each exactly once.
    backbone_ids = {id(p) for p in backbone.parameters()}
    head_ids = {id(p) for p in head.parameters()}
    assert not backbone_ids & head_ids
    assert backbone_ids | head_ids == {id(p) for p in model.parameters()}


def test_head_trains_alone_on_detached_features() -> None:
    model = _build("tv_resnet18").eval()
    backbone, head = split(model, "layer3")
    assert head.get_submodule("fc") is model.fc
    assert head.get_submodule("layer4.1.conv2") is model.layer4[1].conv2
    with torch.no_grad():
        features = backbone(_images(batch=4))
    assert features.shape == (4, 256, 4, 4)
    head.train()
    # The head shares the model's leaf modules (its containers are its own): only those after the cut train.
    assert model.layer4[1].bn2.training and model.fc.training
    assert not model.layer3[1].bn2.training and not model.bn1.training and not backbone.training
    labels = torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(head(features), labels).backward()
    head_params = list(head.parameters())
    assert head_params and all(p.grad is not None for p in head_params)
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())
    after_cut = [*model.layer4.parameters(), *model.fc.parameters()]
    assert {id(p) for p in head_params} == {id(p) for p in after_cut}


class _HalveWhenTraining(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 if self.training else x


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        self.stem = nn.Linear(4, 4)
        self.mid = _HalveWhenTraining()
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `scale` is read before and after the cut at `stem`: the head must get it too.
        return self.out(self.mid(self.stem(x * self.scale)) * self.scale)


def _toy_input(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_head_switches_train_and_eval_graphs_like_the_model() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _Toy().eval()
    x = _toy_input()
    backbone, head = split(model, "stem")
    assert head.get_parameter("scale") is model.scale
    features = backbone(x)
    torch.testing.assert_close(head(features), model(x))
    head.train()
    model.train()
    halved = model.out(model.stem(x * model.scale) * 0.5 * model.scale)
    torch.testing.assert_close(head(features), halved)
    torch.testing.assert_close(model(x), halved)
    assert not torch.allclose(halved, head.eval()(features))


def test_split_keeps_mode_dtype_and_mixed_submodule_modes() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _Toy().double()
    model.train()
    model.stem.eval()
    backbone, head = split(model, "mid")
    assert backbone.training and head.training
    assert model.training and not model.stem.training and model.mid.training
    x = _toy_input(torch.float64)
    features = backbone(x)
    assert features.dtype == torch.float64 and features.shape == (3, 4)
    torch.testing.assert_close(head(features), model(x))


def test_mid_residual_layer_is_refused_naming_the_skip_and_nearest_cuts() -> None:
    model = _shared_eval_model("tv_resnet18")
    with pytest.raises(ValueError) as info:
        split(model, "layer4.0.conv2")
    assert str(info.value) == (
        "layer='layer4.0.conv2' cannot split ResNet: it is bypassed by a skip connection or parallel branch: "
        "the output of layer4.0.downsample reaches the add in layer4.0 without passing through it; "
        "nearest cut points: layer3 (before it), layer4.0 (after it)."
    )


def test_vit_attention_is_refused_with_its_blocks_as_suggestions() -> None:
    with pytest.raises(
        ValueError,
        match=r"'blocks.3.attn'.*the output of blocks.2 reaches the add in blocks.3.*"
        r"nearest cut points: blocks.2 \(before it\), blocks.3 \(after it\)",
    ):
        split(_shared_eval_model("timm_vit_tiny"), "blocks.3.attn")


def test_module_called_twice_is_refused() -> None:
    # torchvision's BasicBlock applies its one `relu` module twice.
    with pytest.raises(ValueError, match=r"'layer4.0.relu'.*called 2 times.*layer3 \(before it\), layer4.0 \(after"):
        split(_shared_eval_model("tv_resnet18"), "layer4.0.relu")


class _SkipWhenTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.mid = nn.Linear(4, 4), nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        y = self.mid(h)
        return self.out(y + h if self.training else y)


def test_layer_bypassed_only_in_train_mode_is_refused() -> None:
    with pytest.raises(
        ValueError,
        match=r"layer='mid' cannot split _SkipWhenTraining in train mode: it is bypassed.*"
        r"the output of stem reaches the add in the model's forward.*stem \(before it\), out \(after",
    ):
        split(_SkipWhenTraining().eval(), "mid")


class _ChecksInputLate(nn.Module):
    """Asserts on the input's shape after ``stem``: a dead branch that reads the input past the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        torch._assert(x.shape[1] == 4, "expected 4 features")
        return self.out(h)


def test_dead_reads_of_the_input_after_the_cut_do_not_block_it() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _ChecksInputLate()
    backbone, head = split(model, "stem")
    x = _toy_input()
    torch.testing.assert_close(head(backbone(x)), model(x))
    assert not any(node.target is torch._assert for node in head.graph.nodes)


def test_unknown_layer_names_close_match() -> None:
    expected = r"layer='layer5' is not a layer of this model; closest names: layer4"
    with pytest.raises(ValueError, match=expected):
        split(_shared_eval_model("tv_resnet18"), "layer5")


@pytest.mark.parametrize("pseudo", ["input", "output"])
def test_pseudo_layers_are_not_cut_points(pseudo: str) -> None:
    with pytest.raises(ValueError, match=rf"layer='{pseudo}' is a pseudo-layer, not a cut point.*layer4"):
        split(_shared_eval_model("tv_resnet18"), pseudo)


def test_non_string_layer_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"layer must be a module name.*got int 4"):
        split(_Toy(), 4)  # type: ignore[arg-type]


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.sum() > 0:
            x = -x
        return self.out(x)


def test_untraceable_model_gets_reason_and_workaround() -> None:
    with pytest.raises(ValueError) as info:
        split(_DataDependent(), "stem")
    message = str(info.value)
    assert "cannot trace _DataDependent" in message
    assert "(TraceError: symbolically traced variables cannot be used as inputs to control flow)" in message
    assert "Split the model by hand into two modules" in message
