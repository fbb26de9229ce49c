import gc

import pytest
import torch
import torchvision
from torch import nn

from hookmix import HookMixer
from tests.conftest import MODEL_FACTORIES, TabularMLP, expected_mix, make_model, recover_mix


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", list(MODEL_FACTORIES))
def test_layer_output_is_mixed_and_earlier_layers_untouched(name):
    model, shape, layer = make_model(name)
    model.train()
    module = model.get_submodule(layer)
    first = next(m for n, m in model.named_children())
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (5,), generator=torch.Generator().manual_seed(2))
    seen: dict[str, torch.Tensor] = {}
    raw = module.register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o.detach().clone()))
    early = first.register_forward_hook(lambda m, a, o: seen.__setitem__("early", o.detach().clone()))
    model(x)
    plain_early = seen["early"]
    with HookMixer(model, layer, alpha=0.4, lam_mode="sample", seed=0) as mixer:
        after = module.register_forward_hook(lambda m, a, o: seen.__setitem__("mixed", o.detach().clone()))
        step = mixer.plan(y)
        model(x)
        after.remove()
    raw.remove(), early.remove()
    assert step.mixed and step.layers == (layer,)
    torch.testing.assert_close(seen["mixed"], expected_mix(seen["raw"], step.lam, step.perm), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen["mixed"], seen["raw"])
    assert torch.equal(seen["early"], plain_early)


def test_frozen_backbone_gradients_reach_only_the_head():
    model = torchvision.models.resnet18(num_classes=4)
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc.requires_grad_(True)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    seen = {}
    model.layer4.register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o.detach().clone()))
    model.avgpool.register_forward_pre_hook(lambda m, a: seen.__setitem__("mixed", a[0].detach().clone()))
    with HookMixer(model, "layer4", seed=0) as mixer:
        step = mixer.plan(y)
        step.loss(nn.CrossEntropyLoss(), model(x)).backward()
    lam, partner, residual = recover_mix(seen["raw"], seen["mixed"])
    assert residual.max() < 1e-5 and (lam < 1).all()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("fc."))
    # the head's gradient is that of the mixed features under the mixed loss, computed by hand
    head = nn.Linear(512, 4)
    head.load_state_dict(model.fc.state_dict())
    feats = expected_mix(seen["raw"], lam, partner).mean(dim=(2, 3))
    out = head(feats)
    ce = nn.functional.cross_entropy
    (lam[0] * ce(out, y) + (1 - lam[0]) * ce(out, y[partner])).backward()
    torch.testing.assert_close(model.fc.weight.grad, head.weight.grad, rtol=1e-4, atol=1e-6)


def test_gradients_flow_through_both_partners():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    x = torch.randn(4, 3, requires_grad=True)
    rows = torch.arange(1.0, 5.0)[:, None]  # weight the rows: a plain sum is blind to a batch-wide mix
    with HookMixer(model, "0", seed=0) as mixer:
        step = mixer.plan(batch_size=4)
        (model(x) * rows).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    (model[1](expected_mix(model[0](reference), step.lam, step.perm)) * rows).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)
    unmixed = x.detach().clone().requires_grad_(True)
    (model(unmixed) * rows).sum().backward()
    assert not torch.allclose(x.grad, unmixed.grad)


@pytest.mark.parametrize("context", ["eval", "no_grad", "inference_mode"])
def test_eval_and_no_grad_never_mix(context):
    model, shape, layer = make_model("tv_resnet18")
    x = torch.randn(4, *shape)
    model.train(context != "eval")  # without grad the model stays in train mode: the gate under test is grad mode
    with torch.no_grad():
        expected = model(x)
    with HookMixer(model, layer, seed=0) as mixer:
        if context == "eval":
            step = mixer.plan(torch.arange(4))
            out = model(x)
        else:
            manager = torch.no_grad() if context == "no_grad" else torch.inference_mode()
            with manager:
                step = mixer.plan(torch.arange(4))
                out = model(x)
    assert not step.mixed and mixer.steps == 0
    assert torch.equal(out, expected)


def test_armed_plan_survives_an_eval_forward():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    x = torch.randn(4, 3)
    with HookMixer(model, "0", seed=0) as mixer:
        step = mixer.plan(batch_size=4)
        model.eval()
        assert torch.equal(model(x), nn.Sequential(*model)(x))
        model.train()
        seen = []
        h = model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        model(x)
        h.remove()
    torch.testing.assert_close(seen[0], expected_mix(model[0](x).detach(), step.lam, step.perm))


def test_odd_batch_and_batch_of_one():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with HookMixer(model, "0", seed=0) as mixer:
        step = mixer.plan(torch.tensor([0, 1, 0, 1, 1]))
        model(torch.randn(5, 3))
        assert step.mixed and sorted(step.perm.tolist()) == list(range(5))
        x1 = torch.randn(1, 3)
        step = mixer.plan(torch.tensor([1]))
        assert not step.mixed
        assert torch.equal(model(x1), nn.Sequential(*model)(x1))


def test_input_and_output_pseudo_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    plain = nn.Sequential(*model)
    x = torch.randn(6, 3)
    with HookMixer(model, "input", seed=0) as mixer:
        step = mixer.plan(batch_size=6)
        torch.testing.assert_close(model(x), plain(expected_mix(x, step.lam, step.perm)))
    with HookMixer(model, "output", seed=0) as mixer:
        step = mixer.plan(batch_size=6)
        torch.testing.assert_close(model(x), expected_mix(plain(x), step.lam, step.perm))


@pytest.mark.filterwarnings("ignore::hookmix.graph.equivalence.SameMixPointWarning")  # three linear layers: one point
def test_mode_all_mixes_every_layer_with_one_plan():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    plain = nn.Sequential(*model)
    x = torch.randn(6, 3)
    with HookMixer(model, ["0", "2"], mode="all", seed=0) as mixer:
        step = mixer.plan(batch_size=6)
        out = model(x)
    h = expected_mix(plain[0](x), step.lam, step.perm)
    torch.testing.assert_close(out, expected_mix(plain[2](plain[1](h)), step.lam, step.perm))
    assert step.layers == ("0", "2")


@pytest.mark.filterwarnings("ignore::hookmix.graph.equivalence.SameMixPointWarning")  # three linear layers: one point
def test_manifold_mixup_mixes_exactly_the_drawn_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    plain = nn.Sequential(*model)
    x = torch.randn(6, 3)
    drawn = set()
    with HookMixer(model, ["0", "1", "2"], seed=0) as mixer:
        for _ in range(12):
            step = mixer.plan(batch_size=6)
            out = model(x)
            (layer,) = step.layers
            drawn.add(layer)
            h = x
            for i, m in enumerate(plain):
                h = m(h)
                if str(i) == layer:
                    h = expected_mix(h, step.lam, step.perm)
            torch.testing.assert_close(out, h)
    assert drawn == {"0", "1", "2"}


def test_tabular_embeddings_and_continuous_input_share_the_plan():
    model = TabularMLP()
    x_cat = torch.stack([torch.randint(0, 5, (6,)), torch.randint(0, 7, (6,))], dim=1)
    x_cont = torch.randn(6, 3)
    raw, mixed = {}, {}
    for name in ("embeds.0", "embeds.1", "cont"):
        mod = model.get_submodule(name)
        mod.register_forward_hook(lambda m, a, o, n=name: raw.__setitem__(n, o.detach().clone()))
    with HookMixer(model, ["embeds.*", "input"], mode="all", seed=0) as mixer:
        for name in ("embeds.0", "embeds.1"):
            model.get_submodule(name).register_forward_hook(
                lambda m, a, o, n=name: mixed.__setitem__(n, o.detach().clone())
            )
        model.cont.register_forward_pre_hook(lambda m, a: mixed.__setitem__("cont_in", a[0].detach().clone()))
        step = mixer.plan(torch.randint(0, 4, (6,)))
        model(x_cat, x_cont)
    for name in ("embeds.0", "embeds.1"):
        torch.testing.assert_close(mixed[name], expected_mix(raw[name], step.lam, step.perm))
    torch.testing.assert_close(mixed["cont_in"], expected_mix(x_cont, step.lam, step.perm))


class TupleBlock(nn.Module):
    def forward(self, x):
        return x * 2, torch.arange(x.shape[0])


def test_sequence_first_tuple_outputs_with_batch_dim():
    attn = nn.MultiheadAttention(8, 2)  # (N, B, D) in, (out (N, B, D), weights (B, N, N)) out
    model = nn.Sequential()
    model.add_module("attn_wrap", _AttnWrap(attn))
    q = torch.randn(5, 3, 8)  # N=5, B=3
    raw = {}
    attn.register_forward_hook(lambda m, a, o: raw.__setitem__("o", (o[0].detach().clone(), o[1].detach().clone())))
    with HookMixer(model, "attn_wrap.attn", batch_dim=1, seed=0) as mixer:
        seen = {}
        attn.register_forward_hook(lambda m, a, o: seen.__setitem__("o", o))
        step = mixer.plan(batch_size=3)
        model(q)
    ref = expected_mix(raw["o"][0].transpose(0, 1), step.lam, step.perm).transpose(0, 1)
    torch.testing.assert_close(seen["o"][0], ref)
    assert torch.equal(seen["o"][1], raw["o"][1])  # (B, N, N) weights: N on dim 1, not the batch


class _AttnWrap(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, q):
        return self.attn(q, q, q)[0]


def test_same_seed_bitwise_identical_and_resume():
    def run(steps, state=None, start=0):
        model, shape, layer = make_model("tv_resnet18")
        outs = []
        with HookMixer(model, ["layer2", "layer3"], lam_mode="sample", seed=5) as mixer:
            if state is not None:
                mixer.load_state_dict(state)
            for i in range(start, start + steps):
                g = torch.Generator().manual_seed(i)
                x, y = torch.randn(4, *shape, generator=g), torch.randint(0, 5, (4,), generator=g)
                step = mixer.plan(y)
                outs.append(step.loss(nn.CrossEntropyLoss(), model(x)).detach())
            return outs, mixer.state_dict()

    a, _ = run(4)
    b, _ = run(4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    first, state = run(2)
    rest, _ = run(2, state=state, start=2)
    assert all(torch.equal(u, v) for u, v in zip(a, first + rest))


def test_hooks_removed_after_close_with_block_and_exception():
    model = torchvision.models.resnet18(num_classes=3)
    before = hook_count(model)
    mixer = HookMixer(model, ["layer2", "layer3"], mode="all")
    assert hook_count(model) == before + 4  # root pre + post, two layers
    mixer.close()
    mixer.close()
    assert hook_count(model) == before and mixer.closed
    with HookMixer(model, "layer4") as mixer:
        assert hook_count(model) == before + 3
    assert hook_count(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with HookMixer(model, "layer4") as mixer:
            mixer.plan(torch.arange(2))
            model.fc.register_forward_hook(_raise)
            model(torch.randn(2, 3, 32, 32))
    model.fc._forward_hooks.clear()
    assert hook_count(model) == before
    assert mixer._armed is None and mixer._active is None
    gc.collect()


def _raise(*args):
    raise RuntimeError("boom")


def test_exception_in_forward_leaves_nothing_armed():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with HookMixer(model, "0", seed=0) as mixer:
        mixer.plan(batch_size=4)
        with pytest.raises(RuntimeError):
            model(torch.randn(4, 5))  # wrong feature size: torch raises inside the forward
        step = mixer.plan(batch_size=4)  # no "never used" error: the plan was consumed
        model(torch.randn(4, 3))
        assert step.mixed


def test_plan_twice_without_forward_is_an_error():
    model = nn.Sequential(nn.Linear(3, 2))
    with HookMixer(model, "0", seed=0) as mixer:
        mixer.plan(batch_size=2)
        with pytest.raises(ValueError, match="never used"):
            mixer.plan(batch_size=2)
        mixer.plan(batch_size=2)  # the error is reported once


def test_discard_drops_the_armed_plan_and_keeps_the_step_count():
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(4, 3)
    with HookMixer(model, "0", seed=0) as mixer:
        mixer.plan(batch_size=4)
        mixer.discard()
        torch.testing.assert_close(model(x), model[0](x))  # nothing armed: the forward is plain
        step = mixer.plan(batch_size=4)  # no "never used" error
        assert mixer.steps == 2 and step.plan.step == 1
        model(x)


def test_wrapped_models_are_hooked_inside_their_wrapper():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with HookMixer(nn.DataParallel(model), "0", seed=0) as mixer:
        assert mixer.layers == ("0",) and len(model[0]._forward_hooks) == 1


def test_layer_never_reached_is_an_error_at_next_plan():
    model = torchvision.models.resnet18(num_classes=3)
    model.unused = nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="not reached by the traced forward"):
        mixer = HookMixer(model, "unused", seed=0)
    with mixer:
        mixer.plan(batch_size=2)
        model(torch.randn(2, 3, 32, 32))
        with pytest.raises(ValueError, match=r"never called.*unused|unused.*never called"):
            mixer.plan(batch_size=2)


def test_batch_size_mismatch_names_both_sizes():
    model = nn.Sequential(nn.Linear(3, 2))
    with HookMixer(model, "0", seed=0) as mixer:
        mixer.plan(torch.arange(4) % 2)
        with pytest.raises(ValueError, match=r"\(6, 2\).*batch size 4"):
            model(torch.randn(6, 3))


def test_data_parallel_over_several_devices_is_refused_pointing_to_ddp():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    parallel = nn.DataParallel(model)
    parallel.device_ids = [0, 1]  # as on a two-GPU machine: each replica would see half of the batch
    with pytest.raises(ValueError, match=r"DataParallel over devices \[0, 1\].*DistributedDataParallel"):
        HookMixer(parallel, "0")
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        HookMixer(torch.compile(parallel), "0")
    parallel.device_ids = [0]
    HookMixer(parallel, "0").close()  # one device: one forward sees the whole batch
