"""Who mixes: a forward trains — and mixes — when grad is enabled and the part of the model that trains is
in train mode, whatever the root's own flag says (frozen timm / torchvision ViTs, the linear-probe idiom).
Everything is checked from the activations: λ and partners are recovered with our own hooks.

Bugs a maintainer could plausibly make here, and the test that catches each:

* the root's ``training`` flag decides (a frozen ViT's root owns ``cls_token``, so nothing mixes):
  ``test_fit_mixes_a_frozen_vit_whose_root_owns_frozen_parameters``;
* the linear-probe idiom (``model.eval(); model.fc.train()``) never mixes, or warns:
  ``test_linear_probe_idiom_eval_model_with_a_training_head_mixes``;
* eval / ``no_grad`` / ``inference_mode`` forwards mix:
  ``test_whole_model_in_eval_or_without_grad_never_mixes_the_linear_probe``;
* trainable modules in both modes: the gate requires all of them to train (``all`` for ``any``: nothing
  mixes, yet the warning still shows), or warns on every step:
  ``test_trainable_modules_in_both_modes_warn_once_naming_the_fix_and_mix`` (λ and partners recovered
  from the activations of both steps);
* ``fit`` puts a container with a trainable child in eval, or leaves frozen BatchNorm training:
  ``test_fit_puts_only_the_frozen_part_in_eval``;
* the cache path and the hooked loop over a frozen ViT / Swin drift apart:
  ``test_cache_path_equals_the_hooked_loop_on_frozen_vit_and_swin``.
"""

import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

from hookmix import FitConfig, HookMixer, MixSettings, fit
from hookmix.mixing.gate import GateWarning
from tests.conftest import recover_mix


def capture(model: nn.Module, layer: str, reader: str, store: list) -> list:
    """Record (raw output of ``layer``, what ``reader`` received) for every forward with grad enabled; the
    raw hook is registered before the mixer's, so it sees the unmixed output."""
    raw: dict[str, torch.Tensor] = {}
    model.get_submodule(layer).register_forward_hook(lambda m, a, o: raw.__setitem__("raw", o.detach().clone()))

    def read(m: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and isinstance(args[0], torch.Tensor):  # not the cut-point tracer's proxies
            store.append((raw["raw"], args[0].detach().clone()))

    return [model.get_submodule(reader).register_forward_pre_hook(read)]


def frozen_timm_vit() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=4)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head"))
    return model


def frozen_torchvision_vit() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=3
        )
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("heads"))
    return model


@pytest.mark.parametrize(
    "factory, layer, reader",
    [
        (frozen_timm_vit, "blocks.2", "blocks.3"),
        (frozen_torchvision_vit, "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"),
    ],
    ids=["timm_vit", "torchvision_vit"],
)
def test_fit_mixes_a_frozen_vit_whose_root_owns_frozen_parameters(factory, layer, reader) -> None:
    """The root owns cls_token / class_token (frozen), so the old rule put the whole model in eval and mix=True
    trained bit for bit like mix=False."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.arange(16) % 3
    heads = {}
    for mix in (True, False):
        model, seen = factory(), []
        capture(model, layer, reader, seen)
        config = FitConfig(epochs=1, batch_size=8, mix=mix, seed=0)
        result = fit(model, layer, x, y, x[:4], y[:4], config, num_classes=3, progress=False)
        heads[mix] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        if mix:
            assert len(seen) == 2
            for (raw, mixed), drawn in zip(seen, result.lams):
                lam, _, residual = recover_mix(raw, mixed)
                assert residual.max() < 1e-4
                torch.testing.assert_close(lam, torch.full_like(lam, drawn), rtol=1e-4, atol=1e-4)
                assert drawn < 1.0
        else:
            assert all(torch.equal(raw, mixed) for raw, mixed in seen)
    assert any(not torch.equal(a, b) for a, b in zip(heads[True], heads[False]))


def linear_probe() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=4)
    model.requires_grad_(False)
    model.fc.requires_grad_(True)
    return model


def test_linear_probe_idiom_eval_model_with_a_training_head_mixes() -> None:
    model, seen = linear_probe(), []
    capture(model, "layer4", "avgpool", seen)
    model.eval()
    model.fc.train()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    with HookMixer(model, "layer4", seed=0) as mixer, warnings.catch_warnings():
        warnings.simplefilter("error", GateWarning)  # an unambiguous state: no warning
        step = mixer.plan(y)
        step.loss(nn.CrossEntropyLoss(), model(x)).backward()
    ((raw, mixed),) = seen
    lam, partner, residual = recover_mix(raw, mixed)
    assert residual.max() < 1e-5 and (lam < 1).all()
    torch.testing.assert_close(lam, step.lam, rtol=1e-4, atol=1e-4)
    assert torch.equal(partner, step.perm)


@pytest.mark.parametrize("context", ["eval", "no_grad", "inference_mode"])
def test_whole_model_in_eval_or_without_grad_never_mixes_the_linear_probe(context: str) -> None:
    model = linear_probe()
    model.eval()
    model.fc.train(context != "eval")
    x = torch.randn(4, 3, 32, 32)
    expected = model(x).detach()
    manager = {"eval": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[context]
    with HookMixer(model, "layer4", seed=0) as mixer, manager():
        step = mixer.plan(torch.arange(4))
        out = model(x)
    assert not step.mixed and mixer.steps == 0
    assert torch.equal(out, expected)


def test_trainable_modules_in_both_modes_warn_once_naming_the_fix_and_mix() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=4)
    model.train()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()  # the frozen-BatchNorm fine-tuning idiom, BN affine parameters still trainable
    seen: list = []
    capture(model, "layer3", "layer4", seen)
    x = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with HookMixer(model, "layer3", seed=0) as mixer:
        with pytest.warns(GateWarning, match=r"torch\.no_grad\(\).*eval\(\)"):
            steps = [mixer.plan(torch.arange(4))]
        model(x[0])
        with warnings.catch_warnings():
            warnings.simplefilter("error", GateWarning)  # once per mixer: the second step is silent
            steps.append(mixer.plan(torch.arange(4)))
            model(x[1])
    assert len(seen) == 2 and mixer.steps == 2
    for step, (raw, mixed) in zip(steps, seen):  # both steps mixed: λ < 1 and the partners read from the map
        lam, partner, residual = recover_mix(raw, mixed)
        assert residual.max() < 1e-5 and (lam < 0.999).all()
        torch.testing.assert_close(lam, step.lam, rtol=1e-4, atol=1e-4)
        assert torch.equal(partner, step.perm)


def test_fit_puts_only_the_frozen_part_in_eval() -> None:
    """Frozen subtrees (BatchNorm, stochastic depth inside them) go to eval; a container with a trainable
    child never does, and a parameterless module on the trainable side (the head's dropout) trains."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model("resnet18", num_classes=3, drop_rate=0.5, drop_path_rate=0.1)
    model.requires_grad_(False)
    model.fc.requires_grad_(True)
    modes: dict[str, bool] = {}

    def record(module: nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled() and isinstance(args[0], torch.Tensor):
            modes.update({name: m.training for name, m in model.named_modules()})

    model.fc.register_forward_pre_hook(record)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 3
    fit(model, "layer4", x, y, x[:2], y[:2], FitConfig(epochs=1, batch_size=8), num_classes=3, progress=False)
    assert modes[""] and modes["fc"]
    assert not modes["layer1"] and not modes["layer4.1.bn2"] and not modes["layer4.1.drop_path"]
    assert not modes["bn1"] and not modes["conv1"]
    assert modes["global_pool"]  # parameterless child of the trainable root


def tiny_swin() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(
            "swin_tiny_patch4_window7_224",
            num_classes=3,
            img_size=32,
            window_size=2,
            embed_dim=24,
            depths=(1, 1, 1, 1),
            num_heads=(1, 1, 1, 1),
        )
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head"))
    return model


@pytest.mark.parametrize(
    "factory, layer", [(frozen_timm_vit, "blocks.3"), (tiny_swin, "layers.3")], ids=["timm_vit", "timm_swin"]
)
def test_cache_path_equals_the_hooked_loop_on_frozen_vit_and_swin(factory, layer) -> None:
    """The head trained on mixed cached features equals the hooked loop over the frozen backbone."""
    from hookmix import split

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 3
    config = FitConfig(epochs=2, batch_size=4, seed=1, mixing=MixSettings(lam_mode="sample"))
    hooked = factory()
    hooked_result = fit(hooked, layer, x, y, x[:4], y[:4], config, num_classes=3, progress=False)
    model = factory()
    backbone, head = split(model.eval(), layer)
    with torch.no_grad():
        feats, val = backbone(x), backbone(x[:4])
    cached_result = fit(head, "input", feats, y, val, y[:4], config, num_classes=3, progress=False)
    assert cached_result.lams == pytest.approx(hooked_result.lams) and len(hooked_result.lams) == 6
    for a, b in zip(cached_result.history, hooked_result.history):
        for key in ("train_loss", "val_nll", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6)
    for (name, p), q in zip(hooked.named_parameters(), model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
