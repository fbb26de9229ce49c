"""hookmix.headonly.heads: the three head kinds on conv maps, ViT tokens and vectors; the token pooling is the model's
own; the MLP is fastai's create_head; and the reason to have it: mixing the map before a pooled linear head
is mixing its logits, before the MLP it is not.

Bugs a maintainer could plausibly make here, and the test that catches each:

* a timm ViT's ``pool_include_prefix`` not copied into ``TokenPool`` (averaging the patch tokens only, or the
  prefix tokens always): ``test_a_timm_vits_pool_include_prefix_is_copied_and_averages_the_prefix_tokens_or_not``;
  the prefix slice wrong in ``TokenPool``: ``test_token_pool_reduces_as_timm_does``;
* ``assemble`` dropping the ViT's ``num_prefix_tokens`` from the head, so token CutMix during fine-tuning
  swaps the class token: ``test_token_cutmix_on_an_assembled_vit_head_never_swaps_the_class_token``;
* the token pooling or final norm not the model's own: ``test_token_pooling_is_the_timm_models_own``,
  ``test_token_pooling_of_a_torchvision_vit_is_its_class_token_after_the_final_norm``;
* the MLP head not fastai's (layer order, dropout p, bias, ReLU in place): ``test_the_mlp_head_is_fastais_create_head``,
  ``test_the_mlp_head_starts_as_fastais_vision_learner_leaves_it``;
* ``TokenPool``'s defaults wrong (prefix included by default, 0 prefix tokens refused, a negative count taken):
  ``test_token_pool_leaves_the_prefix_out_by_default_and_takes_zero_prefix_tokens``;
* ``from_model`` taking a model with only one of ``global_pool`` / ``num_prefix_tokens``, or a learned attention
  pool next to a copyable ``global_pool`` (``or`` turned ``and``, a getattr without its default):
  ``test_a_model_whose_pooling_cannot_be_copied_is_refused_naming_what_is_missing``,
  ``test_a_vit_like_model_without_norms_or_prefix_flag_pools_its_patch_tokens_bare``;
* a fresh head left on the CPU when the model is elsewhere, or a 1x1 map refused:
  ``test_a_fresh_head_is_put_where_the_model_is_and_takes_a_one_by_one_map``;
* the default seed not 0: ``test_equal_seeds_give_equal_heads_and_leave_the_global_rng_alone``.

Mutants ``make mutate`` leaves alive here, each equivalent: ``bias=None`` for ``bias=False`` (falsy: no bias);
``pool_include_prefix`` defaulting to ``None`` (``bool(None)`` is False); a torchvision ViT's ``TokenPool`` with 2
prefix tokens (``pool="token"`` never reads the count); ``fork_rng(devices=None)`` (also saves the CUDA RNG;
the init draws on the CPU RNG only).
"""

from typing import Any

import pytest
import timm
import torch
import torchvision
from fastai.vision.learner import create_head
from timm.models.vision_transformer import global_pool_nlc
from torch import nn

from hookmix import build_head
from hookmix.graph.splitting import split
from hookmix.headonly.heads import TokenPool
from hookmix.headonly.trained_model import assemble
from hookmix.mixing.mixer import HookMixer
from tests.conftest import recover_mix

NUM_CLASSES = 5
TIMM_POOLS = ("token", "avg", "max", "avgmax")
MLP_LAYERS = (nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU)


def small_vit(global_pool: str = "token", **options: Any) -> nn.Module:
    """A random-init timm ViT on 32x32 images, 16 patch tokens of 8x8; ``options`` go to ``create_model``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(
            "vit_tiny_patch16_224",
            num_classes=NUM_CLASSES,
            img_size=32,
            patch_size=8,
            depth=2,
            global_pool=global_pool,
            **options,
        ).eval()


def small_torchvision_vit() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=NUM_CLASSES
        )
        nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero: logits 0 whatever the pooling
        return model.eval()


def images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def vit_tokens():
    model = small_vit()
    backbone, _ = split(model, "blocks.1")
    with torch.no_grad():
        return model, backbone(images())


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("features", ["conv", "tokens", "vector"])
def test_a_fresh_head_maps_each_feature_kind_to_logits(kind, features, vit_tokens):
    model, tokens = vit_tokens
    x, model_arg = {
        "conv": (torch.randn(6, 8, 3, 3), None),
        "tokens": (tokens, model),
        "vector": (torch.randn(6, 16), None),
    }[features]
    head = build_head(kind, feature_shape=x.shape[1:], num_classes=NUM_CLASSES, model=model_arg)
    assert head.training and head(x).shape == (6, NUM_CLASSES)
    first = head[0]  # what pools: the map over H, W, the tokens as the ViT does, a vector not at all
    expected = {"conv": "AdaptiveConcatPool2d" if kind == "mlp" else "AdaptiveAvgPool2d", "tokens": "TokenPool"}
    assert type(first).__name__ == expected.get(features, "BatchNorm1d" if kind == "mlp" else "Linear")


def test_concat_pool_is_max_then_average_over_the_map():
    x = torch.randn(4, 8, 3, 3)
    head = build_head("mlp", feature_shape=(8, 3, 3), num_classes=NUM_CLASSES)
    pooled = head[0](x)
    assert pooled.shape == (4, 16, 1, 1)
    torch.testing.assert_close(pooled.flatten(1), torch.cat([x.amax((2, 3)), x.mean((2, 3))], 1))


@pytest.mark.parametrize("global_pool", TIMM_POOLS)
def test_token_pooling_is_the_timm_models_own(global_pool):
    model = small_vit(global_pool)
    backbone, _ = split(model, "blocks.1")
    x = images()
    with torch.no_grad():
        tokens = backbone(x)
        head = build_head("linear", feature_shape=tokens.shape[1:], num_classes=NUM_CLASSES, model=model)
        head[-1].load_state_dict(model.head.state_dict())
        torch.testing.assert_close(head.eval()(tokens), model(x), rtol=1e-5, atol=1e-5)
    frozen = [name for name, p in head.named_parameters() if not p.requires_grad]
    assert frozen and all(name.startswith(("0.norm.", "0.fc_norm.")) for name in frozen)  # the copied norms
    assert all(p.requires_grad for p in model.parameters())  # the model's own are untouched


def test_token_pool_leaves_the_prefix_out_by_default_and_takes_zero_prefix_tokens():
    """As timm's ``pool_include_prefix=False`` default: the mean over the tokens after the prefix; a ViT
    without a class token (``num_prefix_tokens=0``) averages every token; a negative count is refused."""
    tokens = torch.randn(4, 9, 6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(TokenPool("avg", 2)(tokens), tokens[:, 2:].mean(dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(TokenPool("avg", 0)(tokens), tokens.mean(dim=1), rtol=0, atol=1e-6)
    for bad in (-1, 1.0):
        with pytest.raises(ValueError) as error:
            TokenPool("avg", bad)
        assert str(error.value) == f"num_prefix_tokens={bad!r} must be an int >= 0 (class/register tokens)."


def stand_in(**attributes: Any) -> nn.Module:
    """A module carrying some of the attributes ``TokenPool.from_model`` reads from a timm ViT, nothing else."""
    module = nn.Module()
    for name, value in attributes.items():
        setattr(module, name, value)
    return module


@pytest.mark.parametrize(
    "attributes, message",
    [
        ({"global_pool": "avg"}, "model (Module) has no ViT token pooling"),
        ({"global_pool": "avg", "num_prefix_tokens": -1}, "model (Module) has no ViT token pooling"),
        ({"num_prefix_tokens": 1}, "model (Module) has no ViT token pooling"),
        (
            {"global_pool": "avg", "num_prefix_tokens": 1, "attn_pool": nn.Linear(2, 2)},
            "model.global_pool='avg' (Module) is not a pooling build_head can copy",
        ),
        ({"global_pool": "", "num_prefix_tokens": 1}, "model.global_pool='' (Module) is not a pooling"),
    ],
    ids=["no_prefix_count", "negative_prefix_count", "no_global_pool", "attention_pool", "no_pooling"],
)
def test_a_model_whose_pooling_cannot_be_copied_is_refused_naming_what_is_missing(attributes, message):
    """A learned attention pool is refused even next to a copyable ``global_pool``; a ViT-like model with
    only one of ``global_pool`` / ``num_prefix_tokens`` (or a negative count) has no pooling to copy."""
    with pytest.raises(ValueError) as error:
        build_head("linear", feature_shape=(17, 8), num_classes=NUM_CLASSES, model=stand_in(**attributes))
    assert message in str(error.value)


@pytest.mark.parametrize("pool", TIMM_POOLS)
@pytest.mark.parametrize("include_prefix", [False, True])
def test_token_pool_reduces_as_timm_does(pool, include_prefix):
    tokens = torch.randn(4, 9, 6, generator=torch.Generator().manual_seed(2))
    expected = global_pool_nlc(tokens, pool, num_prefix_tokens=2, reduce_include_prefix=include_prefix)
    torch.testing.assert_close(TokenPool(pool, 2, include_prefix)(tokens), expected)


def test_token_pooling_of_a_torchvision_vit_is_its_class_token_after_the_final_norm():
    model = small_torchvision_vit()
    backbone, _ = split(model, "encoder.layers.encoder_layer_1")
    x = images()
    with torch.no_grad():
        tokens = backbone(x)
        head = build_head("linear", feature_shape=tokens.shape[1:], num_classes=NUM_CLASSES, model=model)
        head[-1].load_state_dict(model.heads.head.state_dict())
        torch.testing.assert_close(head.eval()(tokens), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, fastai_args", [((8, 3, 3), {}), ((16,), {"pool": False})], ids=["conv", "vector"])
def test_the_mlp_head_is_fastais_create_head(shape, fastai_args):
    ours = build_head("mlp", feature_shape=shape, num_classes=NUM_CLASSES)
    theirs = create_head(shape[0], NUM_CLASSES, **fastai_args)
    assert [type(m).__name__ for m in ours] == [type(m).__name__ for m in theirs]
    # the MLP layers' settings: BatchNorm eps/momentum, dropout p, Linear bias, ReLU in place (as fastai's)
    settings = [[m.extra_repr() for m in head if isinstance(m, MLP_LAYERS)] for head in (ours, theirs)]
    assert settings[0] == settings[1] and len(settings[0]) == 7
    ours.load_state_dict(theirs.state_dict())  # strict: the same parameters, shapes and buffers, in order
    x = torch.randn(6, *shape)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_the_mlp_head_starts_as_fastais_vision_learner_leaves_it():
    head = build_head("mlp", feature_shape=(64, 2, 2), num_classes=NUM_CLASSES)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    norms = [m for m in head if isinstance(m, nn.BatchNorm1d)]
    assert [m.bias for m in linears] == [None, None]
    hidden = linears[0].weight  # Kaiming normal: std sqrt(2 / fan_in), 65,536 draws
    assert hidden.std().item() == pytest.approx((2 / 128) ** 0.5, rel=0.02) and abs(hidden.mean().item()) < 2e-3
    for norm in norms:
        assert torch.all(norm.weight == 1) and torch.allclose(norm.bias, torch.full_like(norm.bias, 1e-3))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_equal_seeds_give_equal_heads_and_leave_the_global_rng_alone(kind):
    state = torch.get_rng_state()
    a, b, c = (build_head(kind, feature_shape=(8, 3, 3), num_classes=NUM_CLASSES, seed=s) for s in (3, 3, 4))
    default, zero = (build_head(kind, feature_shape=(8, 3, 3), num_classes=NUM_CLASSES, **s) for s in ({}, {"seed": 0}))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(default.state_dict().values(), zero.state_dict().values()))
    for p, q, r in zip(a.state_dict().values(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_a_fresh_head_is_put_where_the_model_is_and_takes_a_one_by_one_map():
    """On the model's device (the meta device stands in for a GPU here); a (C, 1, 1) map is a valid shape."""
    model = nn.Conv2d(3, 8, 3).to("meta")
    for kind in ("linear", "mlp"):
        head = build_head(kind, feature_shape=(8, 1, 1), num_classes=NUM_CLASSES, model=model)
        assert {t.device.type for t in (*head.parameters(), *head.buffers())} == {"meta"}
        assert head.eval()(torch.randn(2, 8, 1, 1, device="meta")).shape == (2, NUM_CLASSES)


def test_a_vit_like_model_without_norms_or_prefix_flag_pools_its_patch_tokens_bare():
    """``from_model`` reads only ``global_pool`` and ``num_prefix_tokens`` from a model that has nothing
    else: no ``norm`` / ``fc_norm`` (identity) and no ``pool_include_prefix`` (timm's default, False)."""
    tokens = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(4))
    model = stand_in(global_pool="avg", num_prefix_tokens=1)
    head = build_head("linear", feature_shape=(5, 6), num_classes=NUM_CLASSES, model=model)
    torch.testing.assert_close(head[0](tokens), tokens[:, 1:].mean(dim=1), rtol=0, atol=1e-6)


def test_kind_model_is_the_head_split_cut_off():
    model = small_vit()
    _, head = split(model, "blocks.1")
    assert build_head("model", feature_shape=(17, 192), num_classes=NUM_CLASSES, model_head=head) is head


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "conv"}, "kind='conv' is not a head kind; use one of 'model', 'linear', 'mlp'"),
        ({"feature_shape": (8, 3, 3, 2)}, "give (C, H, W) for a conv map, (N, D) for tokens, (D,) for a vector"),
        ({"feature_shape": (8, 0, 3)}, "feature_shape=(8, 0, 3) is not the shape"),
        ({"feature_shape": "8x3x3"}, "feature_shape='8x3x3' is not the shape"),
        ({"feature_shape": 8}, "feature_shape=8 is not the shape of one example's features"),
        ({"num_classes": 1}, "num_classes=1 must be an int >= 2 (the head's number of outputs)."),
        ({"seed": -1}, "seed=-1 must be an int >= 0"),
        ({"kind": "model"}, "kind='model' needs model_head=, the head of `backbone, head = split(model, layer)`"),
        (
            {"feature_shape": (17, 192)},
            "holds (N, D) tokens, which a fresh head pools as their model does: pass model=",
        ),
        (
            {"feature_shape": (17, 192), "model": nn.Linear(2, 2)},
            "model (Linear) has no ViT token pooling",
        ),
        (
            {"feature_shape": (16, 192), "model": "map"},
            "model.global_pool='map' (VisionTransformer) is not a pooling build_head can copy",
        ),
    ],
    ids=lambda v: str(v)[:30] if isinstance(v, str) else None,
)
def test_bad_arguments_are_refused_with_the_fix(kwargs, message):
    if kwargs.get("model") == "map":
        with torch.random.fork_rng(devices=[]):
            kwargs["model"] = timm.create_model(
                "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, global_pool="map", class_token=False
            )
    arguments = {"kind": "linear", "feature_shape": (8, 3, 3), "num_classes": NUM_CLASSES, **kwargs}
    kind = arguments.pop("kind")
    with pytest.raises(ValueError) as error:
        build_head(kind, **arguments)
    assert message in str(error.value)


def mixed_step(kind: str, layer: str):
    """One training step of a fresh ``kind`` head on a (16, 8, 3, 3) batch, mixed at ``layer`` by a seeded
    mixer. Returns the head's gradients, what was mixed (its input or its logits) and that value unmixed,
    recomputed with the same dropout masks."""
    head = build_head(kind, feature_shape=(8, 3, 3), num_classes=NUM_CLASSES, seed=1).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, 3, 3, generator=g), torch.randint(NUM_CLASSES, (16,), generator=g)
    seen = {}
    hook = head[0].register_forward_pre_hook(lambda module, args: seen.update(input=args[0].detach().clone()))
    with HookMixer(head, layer, num_classes=NUM_CLASSES, alpha=1.0, seed=5) as mixer:
        step = mixer.plan(y)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the dropout masks
            out = head(x)
        step.loss(nn.CrossEntropyLoss(), out).backward()
    hook.remove()
    grads = [p.grad.clone() for p in head.parameters()]
    if layer == "input":
        return grads, seen["input"], x
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return grads, out.detach(), head(x)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_mixing_the_map_is_mixing_the_logits_only_before_a_linear_head(kind):
    grads_map, mixed_map, raw_map = mixed_step(kind, "input")
    grads_logits, mixed_logits, raw_logits = mixed_step(kind, "output")
    lam_map, partner_map, residual_map = recover_mix(raw_map, mixed_map)
    lam_logits, partner_logits, residual_logits = recover_mix(raw_logits, mixed_logits)
    # both steps really mixed, with the same λ (well inside (0, 1)) and the same partners
    assert residual_map.max() < 1e-5 and residual_logits.max() < 1e-5
    assert torch.equal(partner_map, partner_logits) and (partner_map != torch.arange(16)).all()
    torch.testing.assert_close(lam_map, lam_logits, rtol=0, atol=1e-5)
    assert 0.05 < lam_map[0] < 0.95
    gap = max((a - b).abs().max().item() for a, b in zip(grads_map, grads_logits))
    scale = max(a.abs().max().item() for a in grads_map)
    if kind == "linear":
        assert gap <= 1e-5
    else:
        assert gap > 1e-2 * scale and gap > 1e-3


@pytest.mark.parametrize("include_prefix", [False, True])
def test_a_timm_vits_pool_include_prefix_is_copied_and_averages_the_prefix_tokens_or_not(include_prefix):
    """A ViT with a class token and 2 register tokens (3 prefix tokens, 16 patch tokens), average pooling
    with ``pool_include_prefix`` either way: the fresh head's pooling is the hand computation — the
    model's final norm, the mean over the 16 patch tokens (over all 19 with the flag), then ``fc_norm``."""
    model = small_vit("avg", reg_tokens=2, pool_include_prefix=include_prefix)
    backbone, _ = split(model, "blocks.1")
    with torch.no_grad():
        tokens = backbone(images())
        assert tokens.shape[1] == 19 and model.num_prefix_tokens == 3
        pool = build_head("linear", feature_shape=tokens.shape[1:], num_classes=NUM_CLASSES, model=model)[0]
        normed = model.norm(tokens)
        by_hand = {flag: model.fc_norm(normed[:, 0 if flag else 3 :].mean(dim=1)) for flag in (False, True)}
        pooled = pool.eval()(tokens)
        torch.testing.assert_close(pooled, by_hand[include_prefix], rtol=0, atol=1e-6)
        torch.testing.assert_close(pooled, model.forward_head(tokens, pre_logits=True), rtol=0, atol=1e-6)
    assert (by_hand[True] - by_hand[False]).abs().max() > 1e-2  # the flag matters on these tokens


@pytest.mark.parametrize("kind", ["model", "linear"])
def test_token_cutmix_on_an_assembled_vit_head_never_swaps_the_class_token(kind):
    """``assemble`` gives the head the ViT's ``num_prefix_tokens``, which the mixer fine-tuning hooks on the
    head reads (as ``fit`` builds it, no ``prefix_tokens=``). Seen from the outside, at the head's input over
    8 token-CutMix steps: each row is itself with some tokens pasted from one partner, the class token
    (token 0) is never among them, and λ is the share of the 16 patch tokens kept. Without the attribute
    the class token is pasted at the steps that paste most tokens."""
    backbone, head, fixed = assemble(small_vit(), "blocks.1", kind, input_size=(3, 32, 32), num_classes=NUM_CLASSES)
    assert fixed == ()
    with torch.no_grad():
        tokens = backbone(images(8))
    y, seen, pasted_total, lams, kept = torch.arange(8) % NUM_CLASSES, {}, 0, [], []
    with HookMixer(head.train(), "input", num_classes=NUM_CLASSES, alpha=0.0, cutmix_alpha=1.0, seed=0) as mixer:
        hook = head.register_forward_pre_hook(lambda module, args: seen.update(x=args[0].detach().clone()))
        for _ in range(8):
            step = mixer.plan(y)
            head(tokens)  # a training forward: the mixer mixes only with grad enabled
            pasted = (seen["x"] != tokens).any(dim=-1)  # (B, N): tokens that are not the row's own
            for i in range(8):
                partner = [j for j in range(8) if torch.equal(seen["x"][i][pasted[i]], tokens[j][pasted[i]])]
                expected = torch.where(pasted[i][:, None], tokens[partner[0]], tokens[i])
                assert partner and torch.equal(seen["x"][i], expected)
            pasted_total += int(pasted.sum())
            assert not pasted[:, 0].any(), f"the class token was pasted from another row at step {len(lams)}"
            lams.append(step.plan.lam)
            kept.append(1 - pasted[:, 1:].float().mean(dim=1))
        hook.remove()
    torch.testing.assert_close(torch.stack(lams), torch.stack(kept), rtol=0, atol=1e-6)
    assert pasted_total > 8 * 16  # CutMix really pasted tokens (about half of them)
