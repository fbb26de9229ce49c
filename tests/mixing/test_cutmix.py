"""CutMix at a layer: boxes on (B, C, H, W) maps, token subsets on (B, N, D), λ corrected to the real
area, prefix tokens never swapped, exclusion, and the mixup/cutmix switch."""

import pytest
import timm
import torch
import torchvision
from torch import nn

from hookmix import HookMixer
from hookmix.mixing.blend import cutmix_tensor
from hookmix.mixing.plan import TOKEN_SLOTS, PlanSampler
from hookmix.mixing.settings import MixSettings


def boxes_and_fractions(x, lam, centers):
    perm = torch.roll(torch.arange(x.shape[0]), 1)
    scores = torch.rand(x.shape[0], TOKEN_SLOTS)
    mixed, cut = cutmix_tensor(x, lam, perm, centers, scores, layout="NCHW")
    kept = cut.kept
    from_partner = (mixed == x[perm]).all(dim=1) & (mixed != x).any(dim=1)
    return mixed, kept, from_partner, perm


def test_box_comes_from_partner_and_rest_is_untouched():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 10, 12, generator=g)
    lam = torch.rand(6, generator=g)
    centers = torch.rand(6, 2, generator=g)
    mixed, kept, from_partner, perm = boxes_and_fractions(x, lam, centers)
    for row in range(6):
        pasted = from_partner[row]
        if pasted.any():
            ys, xs = torch.nonzero(pasted, as_tuple=True)
            box = torch.zeros_like(pasted)
            box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
            assert torch.equal(box, pasted)  # one axis-aligned rectangle
        assert torch.equal(mixed[row][:, ~pasted], x[row][:, ~pasted])
        # corrected λ equals the real kept fraction of the map
        assert kept[row].item() == pytest.approx(1 - pasted.float().mean().item(), abs=1e-6)


def test_box_area_follows_lambda_and_clips_at_borders():
    x = torch.randn(2, 1, 20, 20)
    lam = torch.tensor([0.75, 0.75])
    centers = torch.tensor([[0.5, 0.5], [0.0, 0.0]])  # centred box, and one clipped at the corner
    _, kept, from_partner, _ = boxes_and_fractions(x, lam, centers)
    assert from_partner[0].sum() == 100  # side floor(20 * sqrt(0.25)) = 10
    assert from_partner[1].sum() == 25  # clipped to a 5x5 corner
    assert kept.tolist() == pytest.approx([0.75, 1 - 25 / 400])


def test_tokens_swap_a_subset_and_never_the_prefix():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1 + 16, 8, generator=g)  # one class token + 16 patch tokens
    lam = torch.tensor([0.5, 0.25, 1.0, 0.8])
    perm = torch.tensor([1, 2, 3, 0])
    scores = torch.rand(4, TOKEN_SLOTS, generator=g)
    mixed, cut = cutmix_tensor(x, lam, perm, torch.rand(4, 2), scores, layout="NLC", prefix_tokens=1)
    kept = cut.kept
    swapped = (mixed == x[perm]).all(-1) & (mixed != x).any(-1)
    assert not swapped[:, 0].any()
    assert swapped.sum(1).tolist() == [8, 12, 0, 3]  # round((1 - λ) * 16)
    assert kept.tolist() == pytest.approx([0.5, 0.25, 1.0, 1 - 3 / 16])
    assert torch.equal(mixed[~swapped], x[~swapped])


def test_sequence_first_tokens():
    x = torch.randn(9, 3, 4)  # (N, B, D)
    lam = torch.tensor([0.5, 0.5, 0.5])
    perm = torch.tensor([1, 2, 0])
    mixed, cut = cutmix_tensor(x, lam, perm, torch.rand(3, 2), torch.rand(3, TOKEN_SLOTS), layout="LNC")
    swapped = (mixed == x[:, perm]).all(-1) & (mixed != x).any(-1)
    assert swapped.sum(0).tolist() == [4, 4, 4] and cut.kept.tolist() == pytest.approx([5 / 9] * 3)


def test_hooked_cutmix_corrects_lambda_for_the_targets():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    seen = {}
    model[0].register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o.detach().clone()))
    with HookMixer(model, "0", alpha=0, cutmix_alpha=1.0, lam_mode="sample", num_classes=2, seed=0) as mixer:
        model[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("mixed", a[0].detach().clone()))
        y = torch.tensor([0, 1, 0, 1, 1])
        step = mixer.plan(y)
        drawn = step.lam.clone()
        model(torch.randn(5, 3, 7, 7))
    assert step.plan.method == "cutmix"
    raw, mixed = seen["raw"], seen["mixed"]
    pasted = (mixed != raw).any(dim=1)
    torch.testing.assert_close(step.lam, 1 - pasted.float().mean(dim=(1, 2)))
    assert not torch.equal(step.lam, drawn)  # 7x7 maps round the area: λ was corrected
    t = step.targets
    torch.testing.assert_close(t[torch.arange(5), y], step.lam + (1 - step.lam) * (y[step.perm] == y).float())


def test_vit_token_cutmix_respects_num_prefix_tokens():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, reg_tokens=2)
    assert model.num_prefix_tokens == 3
    seen = {}
    model.blocks[1].register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o.detach().clone()))
    with HookMixer(model, "blocks.1", alpha=0, cutmix_alpha=1.0, lam_mode="sample", seed=2) as mixer:
        model.blocks[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("mixed", a[0].detach().clone()))
        step = mixer.plan(batch_size=4)
        model(torch.randn(4, 3, 32, 32))
    raw, mixed = seen["raw"], seen["mixed"]
    partner = raw[step.perm]
    swapped = (mixed == partner).all(-1) & (mixed != raw).any(-1)
    assert not swapped[:, :3].any()
    torch.testing.assert_close(step.lam, 1 - swapped[:, 3:].float().mean(1))


def test_exclusion_applies_to_cutmix():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1))
    with HookMixer(
        model, "0", alpha=0, cutmix_alpha=1.0, lam_mode="sample", num_classes=3, exclude_classes=[2], seed=0
    ) as mixer:
        for _ in range(5):
            y = torch.randint(0, 3, (6,))
            step = mixer.plan(y)
            model(torch.randn(6, 3, 8, 8))
            touched = (y == 2) | (y[step.perm] == 2)
            assert torch.all(step.lam[touched] == 1.0)


def test_switch_probability_between_mixup_and_cutmix():
    sampler = PlanSampler(["x"], MixSettings(alpha=0.4, cutmix_alpha=1.0, switch_prob=0.3), seed=0)
    methods = [sampler.draw(4).method for _ in range(2000)]
    assert abs(methods.count("cutmix") / 2000 - 0.3) < 0.04
    assert {PlanSampler(["x"], MixSettings(alpha=0, cutmix_alpha=1.0), seed=0).draw(4).method} == {"cutmix"}
    with pytest.raises(ValueError, match="both methods off"):
        PlanSampler(["x"], MixSettings(alpha=0))


def test_mode_all_pastes_one_box_that_keeps_step_lam_at_every_layer():
    """Layers of one grid paste the first layer's box; a later layer twice as fine pastes it scaled by 2.
    Before, a later layer cut a new box from the corrected λ: drawn 0.40, step.lam 0.49, later layer kept 0.75."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    seen = {}
    for name in ("0", "1", "2"):
        model.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o.detach().clone()))
    with HookMixer(model, ["0", "1", "2"], mode="all", alpha=0, cutmix_alpha=1.0, lam_mode="sample", seed=0) as mixer:
        for name, reader in (("0", "1"), ("1", "2"), ("2", "3")):
            model.get_submodule(reader).register_forward_pre_hook(
                lambda m, a, n=name: seen.__setitem__(f"mixed{n}", a[0].detach().clone())
            )
        for _ in range(3):
            step = mixer.plan(batch_size=6)
            model(torch.randn(6, 3, 7, 7))
            box = (seen["mixed0"] != seen["0"]).any(dim=1)  # (B, 7, 7) what the first layer pasted
            assert box.any()
            torch.testing.assert_close(step.lam, 1 - box.float().mean(dim=(1, 2)))
            for name, cut in (("1", box), ("2", box.repeat_interleave(2, 1).repeat_interleave(2, 2))):
                raw, mixed, where = seen[name], seen[f"mixed{name}"], cut[:, None].expand_as(seen[name])
                assert torch.equal(mixed[where], raw[step.perm][where])  # the same box, from the partner
                assert torch.equal(mixed[~where], raw[~where])  # and nothing else


def test_mode_all_refuses_boxes_that_cannot_be_scaled_exactly():
    model = torchvision.models.resnet18(num_classes=3)
    with HookMixer(model, ["layer2", "layer3"], mode="all", alpha=0, cutmix_alpha=1.0, seed=5) as mixer:
        mixer.plan(batch_size=4)
        with pytest.raises(ValueError, match=r"8x8 grid.*4x4 grid.*mode='one'"):
            model(torch.randn(4, 3, 64, 64))
