"""Shared fixtures: real torchvision / timm models with random init and small inputs, and a capture
helper that records what a module received and produced during a forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torch import nn


class TabularMLP(nn.Module):
    """A plain tabular model: one embedding per categorical column, a continuous block and an MLP."""

    def __init__(self, cardinalities: tuple[int, ...] = (5, 7), n_cont: int = 3, n_out: int = 4) -> None:
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(c, 4) for c in cardinalities)
        self.cont = nn.Linear(n_cont, 8)
        self.body = nn.Sequential(nn.Linear(4 * len(cardinalities) + 8, 16), nn.ReLU())
        self.head = nn.Linear(16, n_out)

    def forward(self, x_cat: torch.Tensor, x_cont: torch.Tensor) -> torch.Tensor:
        emb = [e(x_cat[:, i]) for i, e in enumerate(self.embeds)]
        return self.head(self.body(torch.cat([*emb, self.cont(x_cont)], dim=1)))


MODEL_FACTORIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str]] = {
    # name: (factory, input shape without batch, a mid/late layer to mix)
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=5), (3, 32, 32), "layer3"),
    "tv_resnet50": (lambda: torchvision.models.resnet50(num_classes=5), (3, 32, 32), "layer4"),
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=5), (3, 32, 32), "layer2"),
    "timm_convnext": (lambda: timm.create_model("convnext_atto", num_classes=5), (3, 32, 32), "stages.2"),
    "timm_efficientnet": (lambda: timm.create_model("efficientnet_b0", num_classes=5), (3, 32, 32), "blocks.4"),
    "timm_vit": (
        lambda: timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, patch_size=8),
        (3, 32, 32),
        "blocks.5",
    ),
}


def make_model(name: str) -> tuple[nn.Module, tuple[int, ...], str]:
    factory, shape, layer = MODEL_FACTORIES[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = factory()
    return model, shape, layer


class Capture:
    """Records the (cloned) output of a module and the input of the module that consumes it."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.handles: list[Any] = []

    def output_of(self, module: nn.Module, key: str) -> "Capture":
        def hook(mod: nn.Module, args: tuple, out: Any) -> None:
            self.values[key] = out.detach().clone()

        self.handles.append(module.register_forward_hook(hook))
        return self

    def input_of(self, module: nn.Module, key: str) -> "Capture":
        def hook(mod: nn.Module, args: tuple) -> None:
            self.values[key] = args[0].detach().clone()

        self.handles.append(module.register_forward_pre_hook(hook))
        return self

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


@pytest.fixture
def capture():
    cap = Capture()
    yield cap
    cap.close()


def lam_view(lam: torch.Tensor, ndim: int) -> torch.Tensor:
    return lam.view(-1, *([1] * (ndim - 1)))


def expected_mix(a: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The reference formula: λ·a + (1−λ)·a[perm]."""
    w = lam_view(lam, a.dim())
    return w * a + (1 - w) * a[perm]


def recover_mix(raw: torch.Tensor, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explain each mixed row as ``λ·raw_i + (1−λ)·raw_j`` from the activations alone.

    For every row i and candidate partner j ≠ i the least-squares λ is found; the partner is the j with the
    smallest residual. Returns λ (B,), the partners (B,) and each row's relative residual (B,) — near 0
    when the row really is such a mix. Rows that did not mix come out with λ = 1 and any partner.
    """
    a, m = raw.flatten(1).double(), mixed.flatten(1).double()
    rows = torch.arange(a.shape[0])
    diff = a[:, None, :] - a[None, :, :]
    rest = m[:, None, :] - a[None, :, :]
    lam = (rest * diff).sum(-1) / (diff * diff).sum(-1).clamp_min(1e-30)
    residual = (rest - lam[..., None] * diff).norm(dim=-1)
    residual[rows, rows] = float("inf")
    partner = residual.argmin(dim=1)
    return lam[rows, partner].float(), partner, residual[rows, partner] / m.norm(dim=1).clamp_min(1e-30)


def write_folder(
    root: Path, classes: tuple[str, ...] = ("cat", "dog", "eel"), per_class: int = 4, size: int = 24
) -> Path:
    """An ImageFolder of random RGB PNGs under ``root``: one sub-folder per class, ``per_class`` images each."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(root / c / f"{i}.png")
    return root
