"""``hookmix.headonly.taps.LayerTaps``: several layers' features from one forward, bitwise those of the split
backbones, and nothing run after the deepest layer.

Bugs a maintainer could plausibly make here, and the test that catches each:
- a tap returning another layer's output, or its map where the pooled point was asked for (or the fixed ops
  applied twice), or features that differ from the split backbone's by rounding:
  ``test_taps_equal_the_split_backbones_bitwise``;
- the forward not stopped (the rest of the model, its pooling and classifier, run for nothing), stopped before a
  tapped layer, or the hooks left on the model after the call: ``test_the_forward_stops_after_the_deepest_tap``;
- a layer the forward never runs, or a misspelt one, passing as empty features:
  ``test_a_layer_never_run_or_unknown_is_refused``.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from hookmix.graph.splitting import split
from hookmix.headonly.taps import LayerTaps
from hookmix.headonly.trained_model import assemble

SIZE = (3, 64, 64)


def _resnet() -> nn.Module:
    torch.manual_seed(0)  # the test model's weights only
    return torchvision.models.resnet18(num_classes=5).eval()


def test_taps_equal_the_split_backbones_bitwise() -> None:
    model = _resnet()
    pooled_backbone, _, fixed = assemble(model, "layer4", "model", input_size=SIZE, num_classes=5)
    assert fixed == ("avgpool", "flatten")
    taps = LayerTaps(
        model,
        {"layer2": ("layer2", None), "layer4": ("layer4", None), "layer4+pooled": ("layer4", pooled_backbone[1])},
    )
    x = torch.randn(6, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = taps(x)
        expected = {
            "layer2": split(model, "layer2")[0](x),
            "layer4": split(model, "layer4")[0](x),
            "layer4+pooled": pooled_backbone(x),
        }
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    assert got["layer4+pooled"].shape == (6, 512) and got["layer2"].shape == (6, 128, 8, 8)


def test_the_forward_stops_after_the_deepest_tap() -> None:
    model = _resnet()
    ran: list[str] = []
    for name in ("layer2", "layer3", "layer4", "avgpool", "fc"):
        getattr(model, name).register_forward_pre_hook(lambda m, args, name=name: ran.append(name))
    hooks_before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    taps = LayerTaps(model, {"b": ("layer3", None), "a": ("layer2", None)})
    with torch.no_grad():
        out = taps(torch.randn(2, *SIZE))
    assert ran == ["layer2", "layer3"] and set(out) == {"a", "b"}
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == hooks_before
    ran.clear()
    with torch.no_grad():
        model(torch.randn(2, *SIZE))  # the model itself is left as it was: it runs to the end
    assert ran == ["layer2", "layer3", "layer4", "avgpool", "fc"]


def test_a_layer_never_run_or_unknown_is_refused() -> None:
    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.unused = nn.Conv2d(3, 4, 3), nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    model = Skips()
    with pytest.raises(ValueError, match=r"never ran the tapped layers \['unused'\]"):
        LayerTaps(model, {"u": ("unused", None), "c": ("conv", None)})(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="layer='layer9' is not a layer of this model"):
        LayerTaps(model, {"x": ("layer9", None)})
    with pytest.raises(ValueError, match="taps is empty"):
        LayerTaps(model, {})
