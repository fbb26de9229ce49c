"""Where mixing a layer equals mixing later (hookmix.equivalence), checked against gradients.

The mixer mixes at layer L; λ and partners are recovered from L's activations with our own hooks; then the
same mix is done by hand at a later point P of an unmixed forward, and the head's gradients are compared:
equal where the analysis claims L ≡ P, different where it does not.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from hookmix import HookMixer, mix_equivalence, split
from hookmix.equivalence import SameMixPointWarning, same_mix_points
from hookmix.layers import format_layers, list_layers
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
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


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
    """Gradients of the same mix done by hand at ``point`` (a module, or "output": the logits)."""
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
    found = mix_equivalence(model, "layer4")
    assert (found.fixed_ops, found.stop, found.same_as_output) == (("avgpool", "flatten"), "fc", True)
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
        (_Head(0.0, start_dim=0), ("mean", "mul"), "flatten", False),  # flattening the batch axis mixes rows
        (_Head(0.0, square=True), ("mean",), "mul", False),  # x * x is not linear in x
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
