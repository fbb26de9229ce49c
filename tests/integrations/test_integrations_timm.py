import subprocess
import sys
from pathlib import Path

import pytest
import timm.data.mixup
import timm.loss
import torch
import torch.nn.functional as F
from torch import nn

from hookmix.integrations.timm import HookMixup
from tests.conftest import expected_mix

ROOT = Path(__file__).resolve().parents[2]
C = 5


def tiny_net() -> nn.Sequential:
    """conv -> relu ("1", the mixed layer, (B, 8, H, W)) -> conv -> relu -> pool -> linear (B, C)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, C),
        )


def batch(rows: int, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    return torch.randn(rows, 3, size, size, generator=g), torch.randint(0, C, (rows,), generator=g)


def smooth_one_hot(y: torch.Tensor, smoothing: float) -> torch.Tensor:
    return F.one_hot(y, C).float() * (1 - smoothing) + smoothing / C


def test_odd_batch_returns_x_untouched_and_soft_targets_of_the_layer_mix() -> None:
    net = tiny_net()
    x, y = batch(7)
    with HookMixup(net, "1", mixup_alpha=0.4, label_smoothing=0.1, num_classes=C, seed=0) as mixup_fn:
        x_out, soft = mixup_fn(x, y)
        out = net(x_out)
        step = mixup_fn.step
    assert x_out is x
    assert step.mixed and soft.shape == (7, C) and soft.dtype == torch.float32
    lam = step.lam[0]
    torch.testing.assert_close(soft, lam * smooth_one_hot(y, 0.1) + (1 - lam) * smooth_one_hot(y[step.perm], 0.1))
    torch.testing.assert_close(soft.sum(1), torch.ones(7))
    with torch.no_grad():
        expected = net[2:](expected_mix(net[:2](x), step.lam, step.perm))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # SoftTargetCrossEntropy on the soft targets is the loss-mixed smoothed cross-entropy
    smoothed_ce = nn.CrossEntropyLoss(label_smoothing=0.1)
    mixed_ce = lam * smoothed_ce(out, y) + (1 - lam) * smoothed_ce(out, y[step.perm])
    torch.testing.assert_close(timm.loss.SoftTargetCrossEntropy()(out, soft), mixed_ce)


def test_timm_train_one_epoch_pattern_uses_every_plan() -> None:
    net = tiny_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss_fn = timm.loss.SoftTargetCrossEntropy()
    mixup_fn = HookMixup(net, "1", mixup_alpha=0.4, num_classes=C, seed=0)
    losses = []
    for rows in (8, 5, 8, 3):  # a short last batch and odd sizes, which timm's Mixup refuses
        x, y = batch(rows)
        x, y = mixup_fn(x, y)
        loss = loss_fn(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    mixup_fn.mixer.plan(batch(2)[1])  # raises if a plan was left unused
    assert mixup_fn.mixer.steps == 5 and mixup_fn.mixer.mixed_steps == 5
    assert all(0 < loss < 10 for loss in losses)


def test_disabled_mixup_gives_timms_smoothed_targets_and_arms_nothing() -> None:
    net = tiny_net()
    x, y = batch(6)
    mixup_fn = HookMixup(net, "1", num_classes=C, label_smoothing=0.1, seed=0)
    mixup_fn.mixup_enabled = False
    x_out, soft = mixup_fn(x, y)
    torch.testing.assert_close(soft, timm.data.mixup.mixup_target(y, C, lam=1.0, smoothing=0.1))
    with torch.no_grad():
        plain = nn.Sequential(*net)(x)  # same modules, no hooks on the root
    torch.testing.assert_close(net(x_out), plain)
    assert mixup_fn.mixer.steps == 0
    mixup_fn.mixup_enabled = True
    mixup_fn(x, y)
    assert mixup_fn.step.mixed


def test_eval_mode_never_mixes() -> None:
    net = tiny_net().eval()
    x, y = batch(6)
    mixup_fn = HookMixup(net, "1", num_classes=C, label_smoothing=0.0, seed=0)
    _, soft = mixup_fn(x, y)
    assert torch.equal(soft, F.one_hot(y, C).float())
    with torch.no_grad():
        plain = nn.Sequential(*net)(x)
    torch.testing.assert_close(net(x), plain)


@pytest.mark.parametrize("idiom", ["train", "linear_probe"])
def test_cutmix_targets_follow_the_area_really_pasted(idiom: str) -> None:
    net = tiny_net()
    if idiom == "linear_probe":  # model.eval(); classifier.train(): the forward trains, the root's flag is off
        net.requires_grad_(False).eval()
        net[6].requires_grad_(True).train()
    x, y = batch(6, size=3)  # a 3x3 map: kept areas are multiples of 1/9, never the drawn λ
    seen = {}
    net[1].register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o.detach().clone()))
    net[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("mixed", a[0].detach().clone()))
    mixup_fn = HookMixup(net, "1", mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=C, label_smoothing=0.0, seed=3)
    _, soft = mixup_fn(x, y)
    drawn = soft.clone()
    net(x)
    raw, mixed = seen["raw"], seen["mixed"]
    pasted = (mixed != raw).any(dim=1)  # (B, 3, 3) positions taken from the partner, measured
    assert torch.equal(mixed[:, :, pasted[0]], raw[mixup_fn.step.perm][:, :, pasted[0]])  # one box, batch mode
    kept = 1 - pasted.float().mean(dim=(1, 2))
    assert (kept < 1).all() and not torch.equal(soft, drawn)
    one_hot = F.one_hot(y, C).float()
    torch.testing.assert_close(soft, kept[:, None] * one_hot + (1 - kept[:, None]) * one_hot[mixup_fn.step.perm])


def test_wrapped_model_is_looked_through() -> None:
    net = tiny_net()
    x, y = batch(4)
    wrapped = nn.DataParallel(net)
    mixup_fn = HookMixup(wrapped, "1", mixup_alpha=0.4, num_classes=C, seed=0)
    mixup_fn(x, y)
    wrapped(x)
    mixup_fn(x, y)  # the first plan was used by the wrapper's forward
    assert mixup_fn.mixer.steps == 2


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(cutmix_minmax=(0.2, 0.8)), ValueError, "cutmix_minmax"),
        (dict(mode="half"), ValueError, "mode='half'"),
    ],
)
def test_unsupported_timm_arguments_refused(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        HookMixup(tiny_net(), "1", num_classes=C, **kwargs)


def test_rows_of_x_and_target_must_agree() -> None:
    mixup_fn = HookMixup(tiny_net(), "1", num_classes=C, seed=0)
    with pytest.raises(ValueError, match="x has 4 rows but target has 3"):
        mixup_fn(batch(4)[0], batch(3)[1])


@pytest.mark.slow
def test_example_runs(tmp_path: Path) -> None:
    script = ROOT / "examples" / "timm_train_loop.py"
    result = subprocess.run(
        [sys.executable, script, "--epochs", "1", "--samples", "64", "--batch-size", "16"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "val accuracy" in result.stdout
