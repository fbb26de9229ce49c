"""hookmix.headonly.training.fit: head-only training on cached features or through a frozen backbone's hooks.

Bugs a maintainer could plausibly make here, and the test that catches each:

* the cached path and the hooked path take different steps (order, λ, frozen BatchNorm training):
  ``test_cached_path_equals_hooked_full_forward``;
* ``mix=False`` draws another data order, or still mixes:
  ``test_no_mix_baseline_draws_the_same_order_and_mixes_nothing``;
* a resumed fit is not bitwise the uninterrupted one, or resumes other settings / another head:
  ``test_resume_continues_bitwise``, ``test_resume_refuses_other_settings_and_other_head``;
* one cached view used for every example: ``test_cached_views_are_drawn_per_example``;
* ``device="cuda"`` ignored (training stays on the CPU), the model not moved, or logits left on the GPU:
  ``test_fit_on_a_named_device_trains_there_and_returns_cpu_logits`` (GPU machines only; skipped on a
  CPU-only one, where every device name is the CPU); ``"auto"`` not picking the GPU:
  ``test_device_is_resolved_and_checked``;
* the multi-label loss not BCE on the mixed label rows: ``test_multilabel_trains_bce_on_the_mixed_label_rows``;
* the validation row reporting a swapped metric (``val_map`` holding F1) or stale logits:
  ``test_multilabel_validation_row_is_the_metrics_of_the_final_heads_logits`` (scikit-learn's mAP and F1);
* dropout heads not reproducible, or a last batch of one crashing BatchNorm:
  ``test_dropout_heads_are_reproducible_and_a_batch_of_one_is_left_out``.
"""

import copy
import json

import pytest
import torch
from torch import nn

from hookmix.app.digits import digits_transfer, pretrain_source
from hookmix.graph.splitting import split
from hookmix.headonly.training import CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, FitConfig, fit
from hookmix.mixing.settings import MixSettings


@pytest.fixture(scope="module")
def task():
    source = pretrain_source(seed=0)
    data = digits_transfer(10, 0)
    backbone, _ = split(source, "stage2")
    with torch.no_grad():
        feats, val = backbone.eval()(data.train_x), backbone(data.val_x)
    return source, data, feats, val


def interrupt_at_call(n: int):
    """A forward pre-hook that raises KeyboardInterrupt on the module's ``n``-th call (an interrupted fit)."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt

    return hook


def fresh_head(source):
    model = copy.deepcopy(source)
    torch.nn.init.zeros_(model.head[-1].weight)
    return model, split(model, "stage2")[1]


def test_cached_path_equals_hooked_full_forward(task):
    source, data, feats, val = task
    config = FitConfig(epochs=4, batch_size=8, lr=1e-2, seed=3, mixing=MixSettings(lam_mode="sample"))
    _, head = fresh_head(source)
    cached = fit(head, "input", feats, data.train_y, val, data.val_y, config, num_classes=5, progress=False)
    model, _ = fresh_head(source)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    bn_before = model.stage2[1].running_mean.clone()
    hooked = fit(
        model, "stage2", data.train_x, data.train_y, data.val_x, data.val_y, config, num_classes=5, progress=False
    )
    for a, b in zip(cached.history, hooked.history):
        for key in ("train_loss", "val_nll", "val_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(head.get_submodule("head.2").weight, model.head[2].weight)
    assert cached.lams == pytest.approx(hooked.lams)
    assert torch.equal(model.stage2[1].running_mean, bn_before)  # frozen BN stayed in eval mode


def test_no_mix_baseline_draws_the_same_order_and_mixes_nothing(task):
    source, data, feats, val = task
    runs = {}
    for mix in (True, False):
        _, head = fresh_head(source)
        runs[mix] = fit(
            head,
            "input",
            feats,
            data.train_y,
            val,
            data.val_y,
            FitConfig(epochs=2, mix=mix),
            num_classes=5,
            progress=False,
        )
    assert runs[False].lams == [] and len(runs[True].lams) == 2 * 2  # 50 examples / 32 per batch
    assert runs[False].history[0]["train_loss"] != runs[True].history[0]["train_loss"]
    assert set(runs[True].final) == {"epoch", "train_loss", "val_nll", "val_accuracy", "val_ece", "lr"}


def test_training_improves_over_the_initial_head(task):
    source, data, feats, val = task
    _, head = fresh_head(source)
    result = fit(
        head,
        "input",
        feats,
        data.train_y,
        val,
        data.val_y,
        FitConfig(epochs=30, lr=3e-2),
        num_classes=5,
        progress=False,
    )
    assert result.final["val_accuracy"] > 0.6  # chance is 0.2
    assert result.history[-1]["val_nll"] < result.history[0]["val_nll"]
    assert result.final["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine schedule ran to its end


def test_resume_continues_bitwise(task, tmp_path):
    source, data, feats, val = task
    config = FitConfig(epochs=4, batch_size=16, seed=1)
    _, head_a = fresh_head(source)
    full = fit(head_a, "input", feats, data.train_y, val, data.val_y, config, num_classes=5, progress=False)
    _, head_b = fresh_head(source)
    head_b.register_forward_pre_hook(interrupt_at_call(2 * 5 + 1))  # 4 train steps + 1 validation per epoch
    with pytest.raises(KeyboardInterrupt):
        fit(
            head_b,
            "input",
            feats,
            data.train_y,
            val,
            data.val_y,
            config,
            num_classes=5,
            checkpoint_dir=tmp_path,
            progress=False,
        )
    assert json.loads((tmp_path / CHECKPOINT_STATE).read_text())["epoch"] == 2
    _, head_c = fresh_head(source)
    resumed = fit(
        head_c,
        "input",
        feats,
        data.train_y,
        val,
        data.val_y,
        config,
        num_classes=5,
        checkpoint_dir=tmp_path,
        resume=True,
        progress=False,
    )
    assert resumed.history == full.history
    assert resumed.lams == full.lams
    for p, q in zip(head_a.parameters(), head_c.parameters()):
        assert torch.equal(p, q)
    state = json.loads((tmp_path / CHECKPOINT_STATE).read_text())
    assert state["epoch"] == 4 and (tmp_path / CHECKPOINT_WEIGHTS).stat().st_size > 0


def test_resume_refuses_other_settings_and_other_head(task, tmp_path):
    source, data, feats, val = task
    _, head = fresh_head(source)
    fit(
        head,
        "input",
        feats,
        data.train_y,
        val,
        data.val_y,
        FitConfig(epochs=1),
        num_classes=5,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(ValueError, match="alpha"):
        fit(
            fresh_head(source)[1],
            "input",
            feats,
            data.train_y,
            val,
            data.val_y,
            FitConfig(epochs=2, mixing=MixSettings(alpha=1.0)),
            num_classes=5,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )
    other = nn.Sequential(nn.Flatten(), nn.Linear(256, 5))
    with pytest.raises(ValueError, match="another head shape"):
        fit(
            other,
            "input",
            feats,
            data.train_y,
            val,
            data.val_y,
            FitConfig(epochs=1),
            num_classes=5,
            checkpoint_dir=tmp_path,
            resume=True,
            progress=False,
        )


def test_cached_views_are_drawn_per_example(task):
    """Each epoch shows every example once, each in a view drawn for that example: batches mix views."""
    source, data, feats, val = task
    views = torch.stack([feats, feats + 1.0])
    _, head = fresh_head(source)
    batches = []
    head.register_forward_pre_hook(lambda m, a: batches.append(a[0].clone()) if torch.is_grad_enabled() else None)
    fit(
        head,
        "input",
        views,
        data.train_y,
        val,
        data.val_y,
        FitConfig(epochs=2, batch_size=10, mix=False),
        num_classes=5,
        progress=False,
    )
    assert len(batches) == 2 * 5
    flat = views.flatten(2)  # (V, N, F)
    seen = []
    for batch in batches:
        match = (batch.flatten(1)[:, None, None, :] == flat[None]).all(-1)  # (B, V, N)
        assert (match.flatten(1).sum(1) == 1).all()  # every row is exactly one view of one example
        _, view, example = torch.nonzero(match).T
        seen.append((view, example))
    for epoch in range(2):
        examples = torch.cat([e for _, e in seen[epoch * 5 : (epoch + 1) * 5]])
        assert sorted(examples.tolist()) == list(range(50))
    assert any(len(view.unique()) == 2 for view, _ in seen)  # views differ inside one batch
    first = {int(e): int(v) for v, e in zip(*map(torch.cat, zip(*seen[:5])))}
    second = {int(e): int(v) for v, e in zip(*map(torch.cat, zip(*seen[5:])))}
    assert first != second  # drawn again each epoch


def test_bad_inputs(task):
    source, data, feats, val = task
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        fit(
            frozen,
            "input",
            torch.randn(4, 3),
            torch.tensor([0, 1, 0, 1]),
            torch.randn(2, 3),
            torch.tensor([0, 1]),
            FitConfig(epochs=1),
            num_classes=2,
            progress=False,
        )
    with pytest.raises(ValueError, match="do not match"):
        fit(
            nn.Linear(3, 2),
            "input",
            torch.randn(5, 3),
            torch.tensor([0, 1, 0, 1]),
            torch.randn(2, 3),
            torch.tensor([0, 1]),
            FitConfig(epochs=1),
            num_classes=2,
            progress=False,
        )
    with pytest.raises(ValueError, match="epochs=0"):
        FitConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        FitConfig(lr=-1.0)


def test_stop_epoch_and_cutmix_on_cached_maps(task):
    source, data, feats, val = task
    _, head = fresh_head(source)
    seen = []
    head.register_forward_pre_hook(lambda m, a: seen.append(["raw", a[0].clone()]) if torch.is_grad_enabled() else None)
    head.get_submodule("head.0").register_forward_pre_hook(
        lambda m, a: seen[-1].append(a[0].detach().clone()) if torch.is_grad_enabled() else None
    )
    config = FitConfig(epochs=3, batch_size=16, mixing=MixSettings(alpha=0.0, cutmix_alpha=1.0, stop_epoch=2))
    result = fit(head, "input", feats, data.train_y, val, data.val_y, config, num_classes=5, progress=False)
    assert len(seen) == 3 * 4 and len(result.lams) == 2 * 4  # 50 examples / 16 per batch, mixing in epochs 0, 1
    kept = []
    for _, raw, mixed in seen:
        own = (mixed == raw).all(dim=1)  # (B, 2, 2) positions that kept all their channels
        kept.append(own.float().mean(dim=(1, 2)))
    measured = torch.stack([k[0] for k in kept[:8]])
    torch.testing.assert_close(measured, torch.tensor(result.lams))  # the targets used the area really kept
    assert (measured < 1).any()  # something was pasted
    assert all(torch.equal(raw, mixed) for _, raw, mixed in seen[8:])  # epoch 2: no mixing


CUDA = torch.cuda.is_available()


def test_device_is_resolved_and_checked() -> None:
    from hookmix import UsageError
    from hookmix.core.devices import resolve_device

    auto = torch.device("cuda") if CUDA else torch.device("cpu")  # (a Mac's MPS is not covered here)
    assert resolve_device("auto") == resolve_device(None) == auto
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    if CUDA:
        count = torch.cuda.device_count()
        with pytest.raises(UsageError, match=f"this machine has {count} CUDA device"):
            resolve_device(f"cuda:{count}")
    else:
        with pytest.raises(UsageError, match="no CUDA device; use device='cpu' or 'auto'"):
            resolve_device("cuda")
    with pytest.raises(UsageError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(UsageError, match=r"device='gpu' is not one of"):
        resolve_device("gpu")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device: on a CPU-only machine every device name is the CPU")
@pytest.mark.parametrize("preload", [True, False], ids=["preloaded", "copied_per_batch"])
def test_fit_on_a_named_device_trains_there_and_returns_cpu_logits(task, preload: bool) -> None:
    """A head on the CPU fitted with ``device="cuda"``: its parameters and buffers move to the GPU, every batch
    (training and validation) reaches it there, the validation logits come back on the CPU, the caller's
    tensors stay where they were (copied, not moved), and the steps are the CPU's (λ drawn on the CPU
    generator: equal floats; losses and weights within float32 GPU-vs-CPU tolerance, not measured yet: no GPU
    was available when this test was written, so it has never run). ``"auto"`` and a model already on the GPU
    with ``device=None`` take the same steps on the same card."""
    source, data, feats, val = task
    config = FitConfig(epochs=2, batch_size=16, seed=2, mixing=MixSettings(lam_mode="sample"))
    args = (feats, data.train_y, val, data.val_y, config)
    _, on_cpu = fresh_head(source)
    cpu_run = fit(on_cpu, "input", *args, num_classes=5, progress=False)
    assert {t.device.type for t in (*on_cpu.parameters(), cpu_run.val_logits)} == {"cpu"}
    runs, heads = {}, {}
    for device in ("cuda", "auto", None):
        _, head = fresh_head(source)
        if device is None:
            head.cuda()
        seen: list[torch.device] = []
        head.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].device))
        runs[device] = fit(head, "input", *args, num_classes=5, device=device, preload=preload, progress=False)
        heads[device] = head
        assert {t.device.type for t in (*head.parameters(), *head.buffers())} == {"cuda"}
        assert {d.type for d in seen} == {"cuda"} and len(seen) >= 2 * config.epochs
        assert runs[device].val_logits.device.type == "cpu"
        assert runs[device].lams == cpu_run.lams and all(type(lam) is float for lam in runs[device].lams)
        assert {t.device.type for t in (feats, val, data.train_y, data.val_y)} == {"cpu"}
    for device in ("auto", None):
        for a, b in zip(runs[device].history, runs["cuda"].history, strict=True):
            assert a == pytest.approx(b, rel=1e-6)
    for a, b in zip(runs["cuda"].history, cpu_run.history, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    for (name, gpu), cpu in zip(heads["cuda"].state_dict().items(), on_cpu.state_dict().values()):
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5, msg=name)


def _multilabel_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, :4] + 0.3 * torch.randn(n, 4, generator=gen) > 0).float()
    return x, y


def test_multilabel_trains_bce_on_the_mixed_label_rows() -> None:
    """(N, C) multi-hot labels: the epoch's one step is BCEWithLogits on λ·y_i + (1−λ)·y_j, with λ and the
    partners j recovered from the head's raw and mixed inputs; validation reports mAP / F1 / BCE / ECE."""
    from tests.conftest import recover_mix

    x, y = _multilabel_data(12, 0)
    val_x, val_y = _multilabel_data(40, 1)
    torch.manual_seed(0)
    head = nn.Sequential(nn.Identity(), nn.Linear(6, 4))
    before = copy.deepcopy(head)
    raw, mixed = [], []
    head.register_forward_pre_hook(lambda m, a: raw.append(a[0].clone()) if torch.is_grad_enabled() else None)
    head[0].register_forward_hook(lambda m, a, o: mixed.append(o.detach().clone()) if torch.is_grad_enabled() else None)
    config = FitConfig(epochs=1, batch_size=12, lr=1e-2, seed=2, mixing=MixSettings(alpha=1.0))
    result = fit(head, "input", x, y, val_x, val_y, config, num_classes=4, progress=False)
    row = result.final
    assert set(row) == {"epoch", "train_loss", "val_nll", "val_map", "val_f1", "val_ece", "lr"}
    rows = torch.stack([torch.nonzero((x == r).all(1))[0, 0] for r in raw[0]])  # the epoch's order
    lam, partner, residual = recover_mix(raw[0], mixed[0])
    assert residual.max() < 1e-5 and (lam - lam[0]).abs().max() < 1e-5
    targets = lam[0] * y[rows] + (1 - lam[0]) * y[rows][partner]
    expected = nn.functional.binary_cross_entropy_with_logits(before(mixed[0]), targets)
    assert row["train_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert 0.0 <= row["val_map"] <= 1.0 and row["val_nll"] > 0


def test_multilabel_validation_row_is_the_metrics_of_the_final_heads_logits() -> None:
    """``val_map`` / ``val_f1`` / ``val_nll`` / ``val_ece`` of the last row are those of the trained head's own
    validation logits: ``evaluate_multilabel(predict(...))``, and mAP and NLL recomputed with scikit-learn and
    ``F.binary_cross_entropy_with_logits`` (a swapped key or stale logits would give other numbers)."""
    from sklearn.metrics import average_precision_score, f1_score

    from hookmix.evaluation.metrics import evaluate_multilabel
    from hookmix.headonly.training import predict

    x, y = _multilabel_data(48, 0)
    val_x, val_y = _multilabel_data(64, 1)
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 4))
    config = FitConfig(epochs=3, batch_size=16, lr=3e-2, seed=2)
    result = fit(head, "input", x, y, val_x, val_y, config, num_classes=4, progress=False)
    logits = predict(head, val_x)
    torch.testing.assert_close(result.val_logits, logits)
    with torch.no_grad():
        torch.testing.assert_close(logits, head(val_x))  # no dropout / BatchNorm: eval logits are the forward's
    expected = evaluate_multilabel(logits, val_y)
    row = result.final
    for key in ("map", "f1", "nll", "ece"):
        assert row[f"val_{key}"] == pytest.approx(expected[key], rel=1e-9), key
    assert row["val_map"] == pytest.approx(average_precision_score(val_y, logits, average="macro"), rel=1e-6)
    assert row["val_f1"] == pytest.approx(f1_score(val_y, logits > 0, average="macro"), rel=1e-6)
    assert row["val_nll"] == pytest.approx(nn.functional.binary_cross_entropy_with_logits(logits, val_y).item())
    assert len({round(r["val_map"], 6) for r in result.history}) > 1  # the head learned: epochs differ
    assert len({round(v, 3) for v in (row["val_map"], row["val_f1"], row["val_ece"])}) == 3  # no key swap hides


def test_dropout_heads_are_reproducible_and_a_batch_of_one_is_left_out(tmp_path) -> None:
    """An MLP head with dropout and BatchNorm: equal seeds give equal weights (the fit seeds the global RNG
    its dropout draws from, and restores it), resuming is bitwise, and 17 rows in batches of 8 leave the
    last row out instead of failing in BatchNorm."""
    x, y = torch.randn(17, 6, generator=torch.Generator().manual_seed(0)), torch.arange(17) % 3

    def mlp() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))

    config = FitConfig(epochs=4, batch_size=8, lr=1e-2, seed=5)
    heads = [mlp(), mlp(), mlp()]
    for head in heads[:2]:
        outside = torch.get_rng_state()
        fit(head, "input", x, y, x, y, config, num_classes=3, progress=False)
        assert torch.equal(torch.get_rng_state(), outside)  # the fit restored the global RNG
        torch.rand(7)  # the global RNG moves on between the fits
    # 2 train steps (the 17th row left out) + 1 validation forward per epoch: stop in epoch 3
    handle = heads[2].register_forward_pre_hook(interrupt_at_call(2 * 3 + 1))
    with pytest.raises(KeyboardInterrupt):
        fit(heads[2], "input", x, y, x, y, config, num_classes=3, checkpoint_dir=tmp_path, progress=False)
    handle.remove()
    assert json.loads((tmp_path / CHECKPOINT_STATE).read_text())["epoch"] == 2
    torch.manual_seed(123)  # whatever the global RNG holds now, the resumed fit continues the checkpoint's
    fit(heads[2], "input", x, y, x, y, config, num_classes=3, checkpoint_dir=tmp_path, resume=True, progress=False)
    for a, b, c in zip(*(h.state_dict().values() for h in heads)):
        assert torch.equal(a, b) and torch.equal(a, c)
