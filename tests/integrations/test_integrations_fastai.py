import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

pytest.importorskip("fastai", reason="the fastai callback needs `pip install hookmix[fastai]`")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fastai.callback.core import Callback, CancelBatchException  # noqa: E402
from fastai.data.core import DataLoaders  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat  # noqa: E402
from torch import nn  # noqa: E402

from hookmix.integrations.fastai import HookMixUp  # noqa: E402
from tests.conftest import expected_mix, recover_mix  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
C = 3


def mlp() -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, C))


def dls(multi_label: bool = False) -> DataLoaders:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(44, 6, generator=g)
    y = (torch.rand(44, C, generator=g) < 0.4).float() if multi_label else torch.randint(0, C, (44,), generator=g)
    items = list(zip(x, y))
    return DataLoaders.from_dsets(items[:32], items[32:], bs=8, shuffle=False, device="cpu")


class Record(Callback):
    """Runs after HookMixUp and checks each training batch against the same step computed by hand."""

    order = 1
    run_valid = False

    def __init__(self, reference_loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.reference_loss = reference_loss
        self.errors: list[float] = []
        self.lams: list[float] = []
        self.yb_errors: list[float] = []

    def after_loss(self) -> None:
        step = self.hook_mix_up.mix_step
        net = self.learn.model
        x, y = self.xb[0], step.y
        with torch.no_grad():
            hidden = net[:2](x)
            lam, partner, residual = recover_mix(hidden, self.mixed_hidden)  # from the activations
            pred = net[2](expected_mix(hidden, lam, partner))
            self.errors.append(
                max(
                    (self.pred - pred).abs().max().item(),
                    residual.max().item(),
                    (self.loss - self.reference_loss(pred, y, lam, partner)).abs().item(),
                )
            )
        if step.kind != "index":
            mixed_y = lam[:, None] * y + (1 - lam[:, None]) * y[partner]
            self.yb_errors.append((self.yb[0] - mixed_y).abs().max().item())
        self.lams.append(lam)

    def before_fit(self) -> None:
        self.handle = self.learn.model[2].register_forward_pre_hook(
            lambda m, a: setattr(self, "mixed_hidden", a[0].detach().clone())
        )

    def after_fit(self) -> None:
        self.handle.remove()


def index_loss(pred: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """fastai's MixUp rule: the rows' losses mixed with their own λ, averaged."""
    own, partner = F.cross_entropy(pred, y, reduction="none"), F.cross_entropy(pred, y[perm], reduction="none")
    return (lam * own + (1 - lam) * partner).mean()


def label_loss(pred: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(pred, lam[:, None] * y + (1 - lam[:, None]) * y[perm])


def test_class_indices_mix_the_layer_and_the_loss_validation_unmixed() -> None:
    loss_func = CrossEntropyLossFlat()
    record = Record(index_loss)
    learn = Learner(dls(), mlp(), loss_func=loss_func, cbs=[HookMixUp("1", alpha=0.4, seed=0), record])
    with learn.no_logging():
        learn.fit(2, 0.1)
        valid_loss = learn.validate()[0]
    lams = torch.stack(record.lams)
    assert lams.shape == (8, 8) and (lams > 0).all() and (lams < 1).all()
    assert max(record.errors) < 1e-5
    assert learn.loss_func is loss_func
    x, y = map(torch.stack, zip(*learn.dls.valid.dataset))
    with torch.no_grad():
        torch.testing.assert_close(valid_loss, F.cross_entropy(learn.model.eval()(x), y).item())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in learn.model.modules()) == 0


def test_multi_label_targets_are_mixed_for_the_unchanged_loss() -> None:
    record = Record(label_loss)
    learn = Learner(
        dls(multi_label=True),
        mlp(),
        loss_func=BCEWithLogitsLossFlat(),
        cbs=[HookMixUp("1", alpha=0.4, seed=0, num_classes=C), record],
    )
    with learn.no_logging():
        learn.fit(1, 0.1)
    assert len(record.lams) == 4 and max(record.errors) < 1e-5 and max(record.yb_errors) < 1e-6


def test_successive_fits_continue_one_stream_of_plans() -> None:
    split = Record(index_loss)
    learn = Learner(dls(), mlp(), loss_func=CrossEntropyLossFlat(), cbs=[HookMixUp("1", seed=0), split])
    whole = Record(index_loss)
    straight = Learner(dls(), mlp(), loss_func=CrossEntropyLossFlat(), cbs=[HookMixUp("1", seed=0), whole])
    with learn.no_logging(), straight.no_logging():
        learn.fit(1, 0.1)
        learn.fit(1, 0.1)
        straight.fit(2, 0.1)
    assert torch.equal(torch.stack(split.lams), torch.stack(whole.lams))
    assert len(torch.stack(whole.lams).unique()) > 8


class SkipSecondBatch(Callback):
    order = 1
    run_valid = False

    def before_batch(self) -> None:
        if self.iter == 1:
            raise CancelBatchException


def test_a_cancelled_batch_leaves_no_stale_plan() -> None:
    record = Record(index_loss)
    learn = Learner(
        dls(), mlp(), loss_func=CrossEntropyLossFlat(), cbs=[HookMixUp("1", seed=0), SkipSecondBatch(), record]
    )
    with learn.no_logging():
        learn.fit(1, 0.1)
    assert len(record.lams) == 3 and max(record.errors) < 1e-5
    assert learn.hook_mix_up._saved["steps"] == 4


def test_defaults_are_fastais_mixup_a_lambda_per_row_each_row_dominant() -> None:
    record = Record(index_loss)
    learn = Learner(dls(), mlp(), loss_func=CrossEntropyLossFlat(), cbs=[HookMixUp("1", seed=0), record])
    with learn.no_logging():
        learn.fit(1, 0.1)
    for lam in record.lams:  # recovered from the hidden activations
        assert len(lam.unique()) == len(lam) and (lam >= 0.5 - 1e-5).all() and (lam < 1).all()
    assert max(record.errors) < 1e-5


class FailsAtBatch(Callback):
    """Raises ``error`` at the given training batch, after HookMixUp armed that batch's plan."""

    order = 1
    run_valid = False

    def __init__(self, error: BaseException, at: int = 2) -> None:
        super().__init__()
        self.error, self.at = error, at

    def before_batch(self) -> None:
        if self.iter == self.at:
            raise self.error


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl_c"])
def test_after_an_interrupted_fit_validation_and_a_new_fit_behave_as_on_a_clean_learner(error) -> None:
    loss_func = CrossEntropyLossFlat()
    failing = FailsAtBatch(error)
    learn = Learner(dls(), mlp(), loss_func=loss_func, cbs=[HookMixUp("1", seed=0)])
    with learn.no_logging(), pytest.raises(type(error)):
        learn.fit(1, 0.1, cbs=[failing])
    valid_loss = learn.validate()[0]  # raised AttributeError: the loss was left wrapped
    x, y = map(torch.stack, zip(*learn.dls.valid.dataset))
    with torch.no_grad():
        torch.testing.assert_close(valid_loss, F.cross_entropy(learn.model.eval()(x), y).item())
    assert learn.loss_func is loss_func
    record = Record(index_loss)
    learn.add_cb(record)
    with learn.no_logging():
        learn.fit(1, 0.1)  # a second fit used to save the wrapper as "the user's loss": RecursionError
    assert len(record.lams) == 4 and max(record.errors) < 1e-5  # each batch mixed once, from its own plan
    assert learn.loss_func is loss_func
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in learn.model.modules()) == 0


@pytest.mark.slow
def test_example_runs(tmp_path: Path) -> None:
    script = ROOT / "examples" / "fastai_train.py"
    result = subprocess.run(
        [sys.executable, script, "--epochs", "1", "--samples", "64"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "val accuracy" in result.stdout
