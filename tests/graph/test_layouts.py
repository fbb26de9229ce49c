"""CutMix needs the layout of the mixed output: whole positions (all channels at once) are pasted, found from
the model — traced graph or timm's output_fmt — or from ``layout=``, and refused where unknown. Mixup needs
no layout. Pasted areas are measured from the activations, never read from hookmix.

Bugs a maintainer could plausibly make in hookmix/graph/layouts.py, and the test that catches each:
- dropping the transpose sign check (a last-axis channel, -1, against ``transpose(1, 2)`` looks unmoved), so
  a Linear followed by ``transpose(1, 2)`` reads as NLC tokens and CutMix swaps channels:
  ``test_layout_reader_follows_transpose_flatten_and_whole_sequentials[linear_transpose_1_2_*]`` and
  ``test_linear_then_transpose_is_refused_not_cut_as_tokens``;
- no longer following ``transpose`` / ``torch.transpose`` at all: ``[linear_transpose_negative_dims]``,
  ``[conv1d_torch_transpose]``;
- flatten: ignoring ``start_dim=`` given by keyword (``[conv2d_torch_flatten_start_dim_kwarg]``), dropping the
  ``nn.Flatten`` module branch (``[conv2d_nn_flatten_module]``), or keeping a channel axis that the flatten
  merges (``[linear_flatten_merging_channels_unknown]``);
- not unwrapping a Sequential the tracer keeps whole (torchvision.ops): as the producer
  (``[ops_sequential_conv_norm_act]``, ``[ops_sequential_mlp]``) or as the reader (``[ops_sequential_as_reader]``);
- misreading a real model's layout: ``test_layout_is_read_from_the_model``; treating channels_last memory
  format as NHWC: ``test_channels_last_memory_format_is_not_a_layout``; guessing instead of refusing:
  ``test_unknown_layout_refuses_cutmix_naming_the_argument_and_mixup_still_works``."""

import pytest
import timm
import torch
import torchvision
from torch import nn

from hookmix import HookMixer
from hookmix.graph.layouts import channel_axes, layout_of


def swin() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return timm.create_model(
            "swin_tiny_patch4_window7_224",
            num_classes=3,
            img_size=64,
            window_size=2,
            embed_dim=24,
            depths=(1, 1, 1, 1),
            num_heads=(1, 1, 1, 1),
        )


def conv1d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(6, 6, 3, padding=1),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


@pytest.mark.parametrize(
    "factory, layer, shape, layout",
    [
        (lambda: torchvision.models.resnet18(num_classes=3), "layer3", (3, 32, 32), "NCHW"),
        (lambda: torchvision.models.resnet18(num_classes=3), "input", (3, 32, 32), "NCHW"),
        (lambda: timm.create_model("convnext_atto", num_classes=3), "stages.1", (3, 32, 32), "NCHW"),
        (lambda: torchvision.models.convnext_tiny(num_classes=3), "features.1", (3, 32, 32), "NCHW"),
        (
            lambda: timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=2),
            "blocks.1",
            (3, 32, 32),
            "NLC",
        ),
        (
            lambda: timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=2),
            "patch_embed",
            (3, 32, 32),
            "NLC",
        ),
        (swin, "layers.1", (3, 64, 64), "NHWC"),
        (lambda: torchvision.models.swin_t(num_classes=3), "features.1", (3, 64, 64), "NHWC"),
        (conv1d_net, "2", (2, 16), "NCL"),
    ],
    ids=[
        "tv_resnet",
        "tv_resnet_input",
        "timm_convnext",
        "tv_convnext",
        "timm_vit",
        "timm_vit_patch_embed",
        "timm_swin",
        "tv_swin",
        "conv1d",
    ],
)
def test_layout_is_read_from_the_model(factory, layer: str, shape: tuple, layout: str) -> None:
    model = factory()
    ranks: dict[str, int] = {"rank": len(shape) + 1}
    if layer != "input":
        handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: ranks.__setitem__("rank", o.dim()))
        model(torch.randn(2, *shape))
        handle.remove()
    axis = channel_axes(model, [layer])[layer]
    assert layout_of(axis, ranks["rank"]) == layout


def pasted_positions(raw: torch.Tensor, mixed: torch.Tensor, perm: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """(B, *positions) bool: positions whose channels all come from the partner; asserts every position is
    wholly the row's own or wholly the partner's (no box cuts across channels)."""
    own = (mixed == raw).all(dim=channel_axis)
    partner = (mixed == raw[perm]).all(dim=channel_axis)
    assert (own | partner).all(), "a position mixes own and partner channels"
    return partner & ~own


def test_swin_cutmix_pastes_whole_positions_of_the_hw_plane() -> None:
    model, seen = swin(), {}
    model.layers[1].register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o.detach().clone()))
    with HookMixer(model, "layers.1", alpha=0, cutmix_alpha=1.0, lam_mode="sample", seed=3) as mixer:
        model.layers[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("mixed", a[0].detach().clone()))
        step = mixer.plan(batch_size=6)
        model(torch.randn(6, 3, 64, 64))
    raw = seen["raw"]
    assert raw.shape[1] == raw.shape[2] != raw.shape[3]  # (B, H, W, C)
    pasted = pasted_positions(raw, seen["mixed"], step.perm, channel_axis=-1)
    assert pasted.any()
    torch.testing.assert_close(step.lam, 1 - pasted.float().mean(dim=(1, 2)))


def test_conv1d_cutmix_pastes_one_segment_of_every_channel() -> None:
    model, seen = conv1d_net(), {}
    model[0].register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o.detach().clone()))
    with HookMixer(model, "0", alpha=0, cutmix_alpha=1.0, lam_mode="sample", seed=1) as mixer:
        model[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("mixed", a[0].detach().clone()))
        step = mixer.plan(batch_size=5)
        model(torch.randn(5, 2, 20))
    pasted = pasted_positions(seen["raw"], seen["mixed"], step.perm, channel_axis=1)
    for row in pasted:
        where = torch.nonzero(row).flatten()
        if len(where):
            assert where.tolist() == list(range(int(where[0]), int(where[-1]) + 1))  # one contiguous segment
    assert pasted.any()
    torch.testing.assert_close(step.lam, 1 - pasted.float().mean(dim=1))


def test_channels_last_memory_format_is_not_a_layout() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=3).to(memory_format=torch.channels_last)
    seen = {}
    model.layer2.register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o.detach().clone()))
    with HookMixer(model, "layer2", alpha=0, cutmix_alpha=1.0, lam_mode="sample", seed=0) as mixer:
        model.layer3.register_forward_pre_hook(lambda m, a: seen.__setitem__("mixed", a[0].detach().clone()))
        step = mixer.plan(batch_size=4)
        model(torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last))
    assert seen["raw"].is_contiguous(memory_format=torch.channels_last)
    pasted = pasted_positions(seen["raw"], seen["mixed"], step.perm, channel_axis=1)
    torch.testing.assert_close(step.lam, 1 - pasted.float().mean(dim=(1, 2)))


def test_unknown_layout_refuses_cutmix_naming_the_argument_and_mixup_still_works() -> None:
    """A linear output reshaped to a 4-D map and flattened again: nothing says where its channels are."""
    model = nn.Sequential(nn.Linear(5, 48), nn.Unflatten(1, (3, 4, 4)), nn.Identity(), nn.Flatten(), nn.Linear(48, 2))
    with HookMixer(model, "1", alpha=0.4, seed=0) as mixer:  # mixup needs no layout
        mixer.plan(batch_size=4)
        model(torch.randn(4, 5))
    with HookMixer(model, "1", alpha=0, cutmix_alpha=1.0, seed=0) as mixer:
        mixer.plan(batch_size=4)
        with pytest.raises(ValueError, match=r"layout=\{'1': 'NCHW'\}"):
            model(torch.randn(4, 5))
    with HookMixer(model, "1", alpha=0.4, cutmix_alpha=1.0, switch_prob=0.01, seed=0) as mixer:
        assert mixer.plan(batch_size=4).plan.method == "mixup"
        with pytest.raises(ValueError, match="layout="):  # refused at the first step, not the first cutmix step
            model(torch.randn(4, 5))
    seen = {}
    model[1].register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o.detach().clone()))
    with HookMixer(model, "1", alpha=0, cutmix_alpha=1.0, lam_mode="sample", layout="NHWC", seed=0) as mixer:
        model[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("mixed", a[0].detach().clone()))
        step = mixer.plan(batch_size=4)
        model(torch.randn(4, 5))
    pasted = pasted_positions(seen["raw"], seen["mixed"], step.perm, channel_axis=-1)  # as the user declared
    torch.testing.assert_close(step.lam, 1 - pasted.float().mean(dim=(1, 2)))


def test_bad_layout_arguments_name_the_fix() -> None:
    model = conv1d_net()
    with pytest.raises(ValueError, match="not one of"):
        HookMixer(model, "0", cutmix_alpha=1.0, layout="NWHC")
    with pytest.raises(ValueError, match="not among the mixed layers"):
        HookMixer(model, "0", cutmix_alpha=1.0, layout={"2": "NCL"})
    with pytest.raises(TypeError, match="layout must be"):
        HookMixer(model, "0", cutmix_alpha=1.0, layout=3)
    with HookMixer(model, "0", alpha=0, cutmix_alpha=1.0, layout="NCHW", seed=0) as mixer:
        mixer.plan(batch_size=2)
        with pytest.raises(ValueError, match="3-letter layout"):
            model(torch.randn(2, 2, 8))


class Between(nn.Module):
    """``first`` -> ``between`` (a traced function or module) -> ``layer`` (the read one) -> ``after``."""

    def __init__(self, first: nn.Module, between, after: nn.Module) -> None:
        super().__init__()
        self.first, self.between, self.layer, self.after = first, between, nn.Identity(), after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.layer(self.between(self.first(x))))


def read_layout(model: nn.Module, layer: str, x: torch.Tensor) -> str | None:
    """The layout hookmix reads for ``layer`` of ``model``, at the rank its output really has."""
    ranks = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: ranks.__setitem__("rank", o.dim()))
    model(x)
    handle.remove()
    return layout_of(channel_axes(model, [layer])[layer], ranks["rank"])


@pytest.mark.parametrize(
    "first, between, after, shape, layout",
    [
        # transpose: a last-axis channel (-1) against positive dims cannot be compared, so the op says nothing
        (nn.Linear(4, 6), lambda x: x.transpose(1, 2), nn.Flatten(), (5, 4), None),
        (nn.Linear(4, 6), lambda x: x.transpose(1, 2), nn.Conv1d(6, 6, 1), (5, 4), "NCL"),
        (nn.Linear(4, 6), lambda x: x.transpose(-1, -2), nn.Flatten(), (5, 4), "NCL"),
        (nn.Conv1d(4, 6, 1), lambda x: torch.transpose(x, 1, 2), nn.Flatten(), (4, 5), "NLC"),
        # flatten keeps the channel axis only when it lies before the merged axes
        (nn.Conv2d(3, 6, 1), lambda x: x.flatten(2), nn.Flatten(), (3, 4, 4), "NCL"),
        (nn.Conv2d(3, 6, 1), lambda x: torch.flatten(x, start_dim=2), nn.Flatten(), (3, 4, 4), "NCL"),
        (nn.Conv2d(3, 6, 1), nn.Flatten(2), nn.Flatten(), (3, 4, 4), "NCL"),
        (nn.Linear(3, 6), lambda x: x.flatten(2), nn.Flatten(), (4, 4, 3), None),  # (B, H, W*C): C merged
        # a Sequential the tracer keeps whole (torchvision.ops): its modules in order, or its first as reader
        (torchvision.ops.Conv2dNormActivation(3, 6), nn.Identity(), nn.Flatten(), (3, 4, 4), "NCHW"),
        (torchvision.ops.MLP(4, [8, 6]), nn.Identity(), nn.Flatten(), (5, 4), "NLC"),
        (nn.Linear(5, 48), nn.Unflatten(1, (3, 4, 4)), torchvision.ops.Conv2dNormActivation(3, 6), (5,), "NCHW"),
    ],
    ids=[
        "linear_transpose_1_2_unknown",
        "linear_transpose_1_2_read_by_conv1d",
        "linear_transpose_negative_dims",
        "conv1d_torch_transpose",
        "conv2d_flatten_method",
        "conv2d_torch_flatten_start_dim_kwarg",
        "conv2d_nn_flatten_module",
        "linear_flatten_merging_channels_unknown",
        "ops_sequential_conv_norm_act",
        "ops_sequential_mlp",
        "ops_sequential_as_reader",
    ],
)
def test_layout_reader_follows_transpose_flatten_and_whole_sequentials(
    first: nn.Module, between, after: nn.Module, shape: tuple, layout: str | None
) -> None:
    """Each case flips (to another layout or to a refusal) if its branch of the reader were dropped."""
    assert read_layout(Between(first, between, after), "layer", torch.randn(2, *shape)) == layout


def test_linear_then_transpose_is_refused_not_cut_as_tokens() -> None:
    """(B, L, C) -> transpose(1, 2) is (B, C, L): cutting it as NLC tokens would swap channels, not positions."""
    model = Between(nn.Linear(4, 6), lambda x: x.transpose(1, 2), nn.Flatten())
    with HookMixer(model, "layer", alpha=0, cutmix_alpha=1.0, seed=0) as mixer:
        mixer.plan(batch_size=3)
        with pytest.raises(ValueError, match=r"layout=\{'layer': 'NCHW'\}"):
            model(torch.randn(3, 5, 4))
