import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning", reason="the Lightning callback needs `pip install hookmix[lightning]`")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from hookmix.integrations.lightning import HookMixCallback  # noqa: E402
from tests.conftest import expected_mix  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
C = 3


def data(rows: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(rows, 6, generator=g), torch.randint(0, C, (rows,), generator=g))


class Classifier(pl.LightningModule):
    """An MLP whose hidden activation ("net.1") is mixed; it records what each loop saw."""

    def __init__(self, **mix: object) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, C))
        self.mix = HookMixCallback("1", module="net", alpha=0.4, seed=0, **mix)
        self.lams: list[float] = []
        self.train_errors: list[float] = []
        self.eval_outputs: dict[str, list[torch.Tensor]] = {"validate": [], "test": [], "predict": []}

    def configure_callbacks(self) -> list[pl.Callback]:
        return [self.mix]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        step = self.mix.step
        loss = step.loss(F.cross_entropy, self.net(x))
        with torch.no_grad():  # the same step by hand: mix the hidden activation, loss-mix the targets
            out = self.net[2](expected_mix(self.net[:2](x), step.lam, step.perm))
            lam = step.lam[0]
            expected = lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[step.perm])
        self.lams.append(lam.item())
        self.train_errors.append((loss - expected).abs().item())
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.eval_outputs["validate"].append(self.net(batch[0]))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.eval_outputs["test"].append(self.net(batch[0]))

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.net(batch[0])
        self.eval_outputs["predict"].append(out)
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(root: Path, epochs: int, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )


def loader(rows: int, seed: int) -> DataLoader:
    return DataLoader(data(rows, seed), batch_size=8)


def test_training_steps_mix_the_layer_and_loss_eval_loops_never_mix(tmp_path: Path) -> None:
    model = Classifier()
    fit = trainer(tmp_path, 1, enable_checkpointing=False, num_sanity_val_steps=0)
    fit.fit(model, loader(30, 0), loader(12, 1))
    assert len(model.lams) == 4 and len(set(model.lams)) == 4 and all(0 < lam < 1 for lam in model.lams)
    assert max(model.train_errors) < 1e-5
    assert model.mix.mixer is None and sum(len(m._forward_hooks) for m in model.net.modules()) == 0
    fit.test(model, loader(12, 1), verbose=False)
    fit.predict(model, loader(12, 1))
    with torch.no_grad():
        reference = model.net.eval()(data(12, 1).tensors[0])
    for stage, outputs in model.eval_outputs.items():  # validation ran after the last training step
        torch.testing.assert_close(torch.cat(outputs), reference, msg=stage)


@pytest.mark.slow
def test_resume_from_a_checkpoint_draws_the_uninterrupted_plans(tmp_path: Path) -> None:
    whole = Classifier()
    every_epoch = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, 2, callbacks=[every_epoch]).fit(whole, loader(24, 0))
    first_epoch = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    resumed = Classifier()
    trainer(tmp_path, 2, enable_checkpointing=False).fit(resumed, loader(24, 0), ckpt_path=first_epoch)
    assert len(whole.lams) == 6 and resumed.lams == whole.lams[3:]
    assert resumed.lams != whole.lams[:3]


def test_state_survives_between_fits_and_seeds_follow_the_rank(tmp_path: Path) -> None:
    model = Classifier()
    trainer(tmp_path, 1, enable_checkpointing=False).fit(model, loader(16, 0))
    assert model.mix.state_dict()["steps"] == 2
    trainer(tmp_path, 1, enable_checkpointing=False).fit(model, loader(16, 0))
    assert model.mix.state_dict()["steps"] == 4
    straight = Classifier()
    trainer(tmp_path, 2, enable_checkpointing=False).fit(straight, loader(16, 0))
    assert model.lams == straight.lams
    assert model.mix.state_dict()["seed"] == 0  # rank 0: rank_seed(0) == 0


class SkipsRestOfFirstEpoch(Classifier):
    def on_train_batch_start(self, batch: object, batch_idx: int) -> int | None:
        return -1 if self.current_epoch == 0 and batch_idx == 1 else None


def test_a_module_skipping_the_rest_of_an_epoch_leaves_no_stale_plan(tmp_path: Path) -> None:
    model = SkipsRestOfFirstEpoch()
    trainer(tmp_path, 2, enable_checkpointing=False).fit(model, loader(24, 0))
    assert len(model.lams) == 1 + 3 and max(model.train_errors) < 1e-5
    assert model.mix.state_dict()["steps"] == 5  # the skipped batch's plan was drawn, then discarded


class FailsOnce(Classifier):
    """Raises in its own on_train_batch_start (after the callback armed the batch's plan) on one batch."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where, self.failed = where, False

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        if self.where == "before_forward" and batch_idx == 1 and not self.failed:
            self.failed = True
            raise RuntimeError("boom before the forward")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.where == "in_step" and batch_idx == 1 and not self.failed:
            self.failed = True
            raise RuntimeError("boom in the step")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("where", ["before_forward", "in_step"])
def test_after_an_interrupted_fit_a_new_fit_mixes_each_batch_once(tmp_path: Path, where: str) -> None:
    model = FailsOnce(where)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, 1, enable_checkpointing=False).fit(model, loader(24, 0))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.net.modules()) == 0
    model.train_errors.clear()
    trainer(tmp_path, 1, enable_checkpointing=False).fit(model, loader(24, 0))
    assert len(model.train_errors) == 3 and max(model.train_errors) < 1e-5  # no stale plan mixed twice
    fit = trainer(tmp_path, 1, enable_checkpointing=False)
    fit.validate(model, loader(12, 1), verbose=False)
    with torch.no_grad():
        reference = model.net.eval()(data(12, 1).tensors[0])
    torch.testing.assert_close(torch.cat(model.eval_outputs["validate"]), reference)


def test_step_outside_training_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="exists only inside training_step"):
        HookMixCallback("1").step


@pytest.mark.slow
def test_example_runs(tmp_path: Path) -> None:
    script = ROOT / "examples" / "lightning_train.py"
    result = subprocess.run(
        [sys.executable, script, "--epochs", "1", "--samples", "64", "--out", tmp_path],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "val accuracy" in result.stdout
