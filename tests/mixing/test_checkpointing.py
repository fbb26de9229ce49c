"""Gradient checkpointing re-runs the mixed layer inside backward: the recomputation must mix with the
forward's plan (λ, partners, cutmix box), so the gradients equal those of the same step without
checkpointing — in both ``use_reentrant`` modes, and for a timm ViT with ``set_grad_checkpointing()``.

Bugs a maintainer could plausibly make in hookmix/mixing/replay.py and the mixer's replay, and the test that
catches each:
- recomputing unmixed, or with a newly drawn λ / partners: ``test_recomputed_layer_mixes_with_the_forwards_plan``;
- with ``mode="all"``, replaying only the plan's first layer (``layer == plan.layers[0]`` in ``find``), not
  leaving the forward's cut on the output (each recomputation cuts a new box), replaying without the cut, or
  not sharing the first layer's cut with the later layer in the forward:
  ``test_mode_all_cutmix_recomputes_both_layers_with_the_forwards_cut`` (the single-layer test misses all four);
- keeping a plan alive past its backward: ``test_an_unplanned_forward_is_recomputed_unmixed``;
- the cut-point trace letting torch's reentrant-checkpoint warning out (the trace hands it fx Proxies, never
  tensors that require grad), which `python -W error` turns into an untraceable model:
  ``test_recomputed_layer_mixes_with_the_forwards_plan[*-reentrant]`` (run with warnings as errors);
- picking a plan at random when one backward recomputes several forwards:
  ``test_two_forwards_in_one_checkpointed_backward_are_refused_naming_checkpointing``."""

import pytest
import timm
import torch
from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt
from torch import nn
from torch.utils.checkpoint import checkpoint

from hookmix import HookMixer


class Checkpointed(nn.Module):
    """stem -> body (conv, BN, ReLU, conv: "body.2" mixed) -> head; ``body`` runs under checkpoint when on."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.body(x) if self.reentrant is None else checkpoint(self.body, x, use_reentrant=self.reentrant)
        return self.head(x)


def grads(
    model: nn.Module, layer: str | list[str], x: torch.Tensor, y: torch.Tensor, **mixer_args
) -> tuple[dict, torch.Tensor]:
    """The parameter gradients of one mixed step, and the targets' λ."""
    model.zero_grad()
    with HookMixer(model, layer, num_classes=4, seed=0, **mixer_args) as mixer:
        step = mixer.plan(y)
        step.loss(nn.CrossEntropyLoss(), model(x)).backward()
        assert step.mixed
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, step.lam


def assert_same_gradients(got: dict, reference: dict) -> None:
    assert got.keys() == reference.keys()
    for name in reference:
        error = (got[name] - reference[name]).norm() / reference[name].norm()
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


def input_batch(rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, 3, 9, 9, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])[:rows]


@pytest.mark.filterwarnings("error")  # as under `python -W error`: the cut-point trace itself must not warn
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("method", ["mixup", "cutmix"])
def test_recomputed_layer_mixes_with_the_forwards_plan(reentrant: bool, method: str) -> None:
    x, y = input_batch()
    x.requires_grad_(True)  # the reentrant mode needs an input that requires grad
    args = {"alpha": 0.4} if method == "mixup" else {"alpha": 0, "cutmix_alpha": 1.0, "lam_mode": "sample"}
    torch.manual_seed(0)
    plain = Checkpointed(None)
    checkpointed = Checkpointed(reentrant)
    checkpointed.load_state_dict(plain.state_dict())
    reference, lam_plain = grads(plain, "body.2", x, y, **args)
    got, lam_ckpt = grads(checkpointed, "body.2", x, y, **args)
    assert_same_gradients(got, reference)
    torch.testing.assert_close(lam_ckpt, lam_plain)  # one cut: the targets' λ is the forward's kept area


def test_an_unplanned_forward_is_recomputed_unmixed() -> None:
    """The plan lives until its own backward ends: a later forward without a plan is not mixed on
    recomputation."""
    x, y = input_batch()
    x.requires_grad_(True)
    torch.manual_seed(0)
    plain, checkpointed = Checkpointed(None), Checkpointed(False)
    checkpointed.load_state_dict(plain.state_dict())
    with HookMixer(checkpointed, "body.2", seed=0) as mixer:
        mixer.plan(y)
        nn.functional.cross_entropy(checkpointed(x), y).backward()
        checkpointed.zero_grad()
        nn.functional.cross_entropy(checkpointed(x), y).backward()  # no plan: trains unmixed
    nn.functional.cross_entropy(plain(x), y).backward()
    assert_same_gradients(
        {n: p.grad for n, p in checkpointed.named_parameters()}, {n: p.grad for n, p in plain.named_parameters()}
    )


def test_two_forwards_in_one_checkpointed_backward_are_refused_naming_checkpointing() -> None:
    x, y = input_batch()
    x.requires_grad_(True)
    model = Checkpointed(False)
    with HookMixer(model, "body.2", seed=0) as mixer:
        loss = mixer.plan(y).loss(nn.CrossEntropyLoss(), model(x))
        loss = loss + mixer.plan(y).loss(nn.CrossEntropyLoss(), model(x))
        with pytest.raises(ValueError, match="gradient checkpointing.*backward after each forward"):
            loss.backward()


@pytest.mark.slow
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_timm_vit_with_grad_checkpointing_gets_the_gradients_of_the_plain_step(reentrant: bool) -> None:
    def vit() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8, depth=4)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32, generator=g).requires_grad_(True), torch.tensor([0, 1, 2, 3, 0, 1])
    reference, _ = grads(vit(), "blocks.1", x, y, alpha=0.4)
    model = vit()
    model.set_grad_checkpointing(True)
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(reentrant)
    try:
        got, _ = grads(model, "blocks.1", x, y, alpha=0.4)
    finally:
        set_reentrant_ckpt(before)
    assert_same_gradients(got, reference)


class TwoSegments(nn.Module):
    """stem -> low (4x4 grid: "low.0" mixed) -> upsample -> high (8x8: "high.0" mixed) -> head; each segment
    runs under its own checkpoint when on, so one backward recomputes both mixed layers."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.low = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2)
        self.high = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def _segment(self, body: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return body(x) if self.reentrant is None else checkpoint(body, x, use_reentrant=self.reentrant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._segment(self.high, self.up(self._segment(self.low, self.stem(x)))))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_mode_all_cutmix_recomputes_both_layers_with_the_forwards_cut(reentrant: bool) -> None:
    """CutMix at two layers in one forward: the 4x4 layer cuts the box, the 8x8 layer pastes it scaled by 2;
    both recomputations paste that same box again."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8, generator=g).requires_grad_(True), torch.tensor([0, 1, 2, 3, 0, 1])
    args = {"alpha": 0, "cutmix_alpha": 1.0, "lam_mode": "sample", "mode": "all"}
    torch.manual_seed(0)
    plain = TwoSegments(None)
    checkpointed = TwoSegments(reentrant)
    checkpointed.load_state_dict(plain.state_dict())
    reference, lam_plain = grads(plain, ["low.0", "high.0"], x, y, **args)
    got, lam_ckpt = grads(checkpointed, ["low.0", "high.0"], x, y, **args)
    assert ((lam_plain > 0) & (lam_plain < 1)).any()  # some rows really paste a box
    assert_same_gradients(got, reference)
    torch.testing.assert_close(lam_ckpt, lam_plain)
