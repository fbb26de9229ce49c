"""The bad-input matrix: every misuse is refused at the API boundary with a ``ValueError`` / ``TypeError``
(``FileNotFoundError`` for a missing file) whose one-line message names the argument, the bad value and the
fix, never a deep torch traceback or a silently wrong result; the CLI answers with exit code 2 and one
error line.

Each case lists the substrings its message must contain: the argument, the bad value, the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

from hookmix import CacheKey, FeatureCache, FitConfig, HookMixer, MixSettings, UsageError, fit
from hookmix.app.cli import main
from hookmix.app.imagefolder import load_image_folder
from hookmix.evaluation.metrics import evaluate
from hookmix.graph.models import create_model, resolve_model
from tests.conftest import write_folder


@dataclass(frozen=True)
class Bad:
    """One misuse: ``call(tmp_path)`` must raise exactly ``error`` with every string of ``says`` in its message."""

    call: Callable[[Path], Any]
    error: type[Exception]
    says: tuple[str, ...]


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def resnet() -> nn.Module:
    return torchvision.models.resnet18(num_classes=3)


def train_step(model: nn.Module, layers: str, x: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> None:
    """plan + forward, the unit in which batch-size and layer-output mistakes surface."""
    with HookMixer(model, layers, seed=0, **kwargs) as mixer:
        mixer.plan(y, batch_size=None if y is not None else x.shape[0])
        model(x)


def plan(y: Any, **kwargs: Any) -> None:
    with HookMixer(mlp(), "0", seed=0, **kwargs) as mixer:
        mixer.plan(y)


class DictOut(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, int]:
        return {"count": x.shape[0]}


class ScalarOut(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


class Probe(nn.Module):
    """A model with a side branch whose output is not a (B, ...) tensor."""

    def __init__(self, side: nn.Module) -> None:
        super().__init__()
        self.side, self.fc = side, nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.side(x)
        return self.fc(x)


def never_reached(_: Path) -> None:
    model = resnet()
    model.unused = nn.Linear(2, 2)
    with HookMixer(model, "unused", seed=0) as mixer:
        mixer.plan(batch_size=2)
        model(torch.randn(2, 3, 32, 32))
        mixer.plan(batch_size=2)


def armed_twice(_: Path) -> None:
    with HookMixer(mlp(), "0", seed=0) as mixer:
        mixer.plan(batch_size=2)
        mixer.plan(batch_size=2)


def plan_after_close(_: Path) -> None:
    mixer = HookMixer(mlp(), "0", seed=0)
    mixer.close()
    mixer.plan(batch_size=2)


def state_of_other_layers(_: Path) -> None:
    model = mlp()
    state = HookMixer(model, "0", seed=0).state_dict()
    HookMixer(model, "2", seed=0).load_state_dict(state)


def set_alpha(_: Path) -> None:
    HookMixer(mlp(), "0").alpha = -1


def fit_small(
    head: nn.Module | None = None,
    *,
    train_y: Any = None,
    val_y: Any = None,
    train_x: Any = None,
    num_classes: Any = 2,
    config: FitConfig | None = None,
    **kwargs: Any,
) -> None:
    """``fit`` on 4 train / 2 val examples of 3 features, with one argument replaced by a bad one."""
    fit(
        head if head is not None else nn.Linear(3, 2),
        "input",
        torch.randn(4, 3) if train_x is None else train_x,
        torch.tensor([0, 1, 0, 1]) if train_y is None else train_y,
        torch.randn(2, 3),
        torch.tensor([0, 1]) if val_y is None else val_y,
        config or FitConfig(epochs=1),
        num_classes=num_classes,
        progress=False,
        **kwargs,
    )


def checkpoint_of_other_head(tmp_path: Path) -> None:
    fit_small(nn.Linear(3, 2), checkpoint_dir=tmp_path)
    fit_small(nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 2)), checkpoint_dir=tmp_path, resume=True)


def checkpoint_of_other_settings(tmp_path: Path) -> None:
    fit_small(checkpoint_dir=tmp_path)
    fit_small(config=FitConfig(epochs=1, mixing=MixSettings(alpha=1.0)), checkpoint_dir=tmp_path, resume=True)


CACHE_KEY = CacheKey(model="test:pool", layer="pool", input_size=(3, 4, 4), transform="none")


def cached(tmp_path: Path) -> Path:
    """A complete on-disk cache of 6 examples in shards of 4 (an average-pool 'backbone')."""
    data = TensorDataset(torch.randn(6, 3, 4, 4), torch.arange(6) % 2)
    FeatureCache.extract(
        nn.AdaptiveAvgPool2d(1), data, CACHE_KEY, path=tmp_path / "cache", shard_size=4, progress=False
    )
    return tmp_path / "cache"


def load_cache_for(**changes: str) -> Callable[[Path], Any]:
    def call(tmp_path: Path) -> Any:
        fields = {**CACHE_KEY.as_dict(), **changes}
        return FeatureCache.load(cached(tmp_path), CacheKey(**fields))

    return call


def truncated_shard(tmp_path: Path) -> None:
    directory = cached(tmp_path)
    shard = directory / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    FeatureCache.load(directory, CACHE_KEY)


def integer_features(_: Path) -> None:
    data = TensorDataset(torch.zeros(2, 3), torch.zeros(2))
    FeatureCache.extract(nn.Identity(), data, CACHE_KEY, dtype=torch.int64, progress=False)


def folder(tmp_path: Path, **kwargs: Any) -> Path:
    return write_folder(tmp_path / "imgs", **kwargs)


def unreadable_image(tmp_path: Path) -> None:
    root = folder(tmp_path)
    (root / "dog" / "3.png").write_bytes(b"not a png")
    split = load_image_folder(root, (3, 16, 16))
    for part in (split.train, split.val):
        for i in range(len(part)):
            part[i]


def single_image_class(tmp_path: Path) -> None:
    root = folder(tmp_path)
    for extra in ("1.png", "2.png", "3.png"):
        (root / "dog" / extra).unlink()
    load_image_folder(root, (3, 16, 16))


def empty_folder(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    load_image_folder(tmp_path / "imgs", (3, 16, 16))


def torch_weights(tmp_path: Path, obj: Any) -> Path:
    torch.save(obj, tmp_path / "w.pt")
    return tmp_path / "w.pt"


NAN, INF = math.nan, math.inf

CASES: dict[str, Bad] = {
    # layers
    "unknown layer": Bad(
        lambda _: HookMixer(resnet(), "layer5"), ValueError, ("layers='layer5'", "not a layer", "closest names: layer4")
    ),
    "glob matching nothing": Bad(
        lambda _: HookMixer(resnet(), "blocks.*"),
        ValueError,
        ("layers='blocks.*'", "matches no layer", "top-level layers are: conv1"),
    ),
    "empty layer list": Bad(lambda _: HookMixer(resnet(), []), ValueError, ("layers=[]", "name at least one layer")),
    "layer not a string": Bad(
        lambda _: HookMixer(resnet(), 4), TypeError, ("layers", "int 4", "a layer name, a glob or a list")
    ),
    "layer the forward never reaches": Bad(
        never_reached, ValueError, ("['unused']", "never called", "choose layers the forward uses")
    ),
    "model not a module": Bad(
        lambda _: HookMixer(lambda x: x, "0"), TypeError, ("model", "function", "torch.nn.Module")
    ),
    # mixing settings
    "alpha 0": Bad(lambda _: HookMixer(mlp(), "0", alpha=0), ValueError, ("alpha=0", "alpha=0.4")),
    "alpha negative": Bad(lambda _: HookMixer(mlp(), "0", alpha=-1), ValueError, ("alpha=-1", "> 0", "alpha=0.4")),
    "alpha NaN": Bad(lambda _: HookMixer(mlp(), "0", alpha=NAN), ValueError, ("alpha=nan", "finite", "alpha=0.4")),
    "alpha inf": Bad(lambda _: HookMixer(mlp(), "0", alpha=INF), ValueError, ("alpha=inf", "finite", "alpha=0.4")),
    "alpha a string": Bad(
        lambda _: HookMixer(mlp(), "0", alpha="0.4"), TypeError, ("alpha", "str '0.4'", "positive number")
    ),
    "alpha set between steps": Bad(set_alpha, ValueError, ("alpha=-1", "> 0", "alpha=0.4")),
    "prob above 1": Bad(lambda _: HookMixer(mlp(), "0", prob=1.5), ValueError, ("prob=1.5", "[0, 1]", "prob=1.0")),
    "prob below 0": Bad(lambda _: HookMixer(mlp(), "0", prob=-0.1), ValueError, ("prob=-0.1", "[0, 1]", "prob=1.0")),
    "lam_mode unknown": Bad(
        lambda _: HookMixer(mlp(), "0", lam_mode="row"), ValueError, ("lam_mode='row'", "'batch' or 'sample'")
    ),
    "mode unknown": Bad(lambda _: HookMixer(mlp(), "0", mode="some"), ValueError, ("mode='some'", "'one'", "'all'")),
    "weights of wrong length": Bad(
        lambda _: HookMixer(mlp(), ["0", "2"], weights=[1.0]),
        ValueError,
        ("weights", "1 entries", "one weight per layer"),
    ),
    "num_classes 1": Bad(lambda _: HookMixer(mlp(), "0", num_classes=1), ValueError, ("num_classes=1", "int >= 2")),
    "target kind unknown": Bad(
        lambda _: HookMixer(mlp(), "0", targets="onehot"), ValueError, ("targets='onehot'", "'index'", "'regression'")
    ),
    "label_smoothing 1": Bad(
        lambda _: HookMixer(mlp(), "0", label_smoothing=1.0, num_classes=2),
        ValueError,
        ("label_smoothing=1.0", "[0, 1)"),
    ),
    "label_smoothing without num_classes": Bad(
        lambda _: HookMixer(mlp(), "0", label_smoothing=0.1), ValueError, ("label_smoothing", "needs num_classes=C")
    ),
    "batch_dim negative": Bad(
        lambda _: HookMixer(mlp(), "0", batch_dim=-1),
        ValueError,
        ("batch_dim=-1", "0 for batch-first, 1 for sequence-first"),
    ),
    "batch_dim beyond the output": Bad(
        lambda _: train_step(mlp(), "0", torch.randn(4, 3), batch_dim=3),
        ValueError,
        ("layer '0'", "(4, 4)", "batch_dim=3", "set batch_dim"),
    ),
    "exclude_classes out of range": Bad(
        lambda _: HookMixer(mlp(), "0", num_classes=3, exclude_classes=[5]),
        ValueError,
        ("exclude_classes=[5]", "in [0, 2]", "list only existing"),
    ),
    "exclude_classes negative": Bad(
        lambda _: HookMixer(mlp(), "0", exclude_classes=[-1]),
        ValueError,
        ("exclude_classes=[-1]", ">= 0", "list only existing"),
    ),
    "exclude_classes a string": Bad(
        lambda _: HookMixer(mlp(), "0", exclude_classes="3"),
        TypeError,
        ("exclude_classes", "str", "list of class indices"),
    ),
    "exclude_classes floats": Bad(
        lambda _: HookMixer(mlp(), "0", exclude_classes=[1.0]),
        TypeError,
        ("exclude_classes", "[1.0]", "int class indices"),
    ),
    "exclude_classes with regression targets": Bad(
        lambda _: plan(torch.randn(4), exclude_classes=[0]),
        ValueError,
        ("exclude_classes", "class targets", "pass class indices"),
    ),
    # targets
    "class index out of range": Bad(
        lambda _: plan(torch.tensor([0, 7]), num_classes=5),
        ValueError,
        ("targets", "contains 7", "num_classes=5", "[0, 4]"),
    ),
    "class indices as floats": Bad(
        lambda _: plan(torch.tensor([0.0, 1.0]), num_classes=5),
        TypeError,
        ("targets", "torch.float32", "num_classes=5", "y.long()"),
    ),
    "float indices forced to index": Bad(
        lambda _: plan(torch.tensor([0.0, 1.0]), targets="index"), TypeError, ("targets", "torch.float32", "y.long()")
    ),
    "negative class index": Bad(
        lambda _: plan(torch.tensor([0, -100])), ValueError, ("targets", "contains -100", ">= 0", "ignore_index")
    ),
    "targets of another batch size": Bad(
        lambda _: train_step(mlp(), "0", torch.randn(6, 3), torch.arange(4) % 2),
        ValueError,
        ("(6, 4)", "batch size 4", "pass this batch's targets"),
    ),
    "batch_size disagrees with targets": Bad(
        lambda _: HookMixer(mlp(), "0").plan(torch.arange(2), batch_size=3),
        ValueError,
        ("batch_size=3", "2 rows", "give one of them"),
    ),
    "batch_size 0": Bad(lambda _: HookMixer(mlp(), "0").plan(batch_size=0), ValueError, ("batch_size=0", "int >= 1")),
    "multi-label values above 1": Bad(
        lambda _: plan(torch.tensor([[0, 2], [1, 0]])),
        ValueError,
        ("label targets", "[0, 2]", "[0, 1]", "targets='regression'"),
    ),
    "soft labels below 0": Bad(
        lambda _: plan(torch.tensor([[-0.5, 1.5], [1.0, 0.0]]), num_classes=2),
        ValueError,
        ("label targets", "[-0.5, 1.5]", "targets='regression'"),
    ),
    "float labels of another width": Bad(
        lambda _: plan(torch.rand(2, 3), num_classes=2),
        ValueError,
        ("targets", "(2, 3)", "num_classes=2", "targets='regression'"),
    ),
    "integer labels of another width": Bad(
        lambda _: plan(torch.zeros(2, 4, dtype=torch.long), num_classes=3),
        ValueError,
        ("label targets", "4 columns", "num_classes=3", "num_classes=4"),
    ),
    "targets of rank 3": Bad(
        lambda _: plan(torch.zeros(2, 2, 2)), ValueError, ("targets", "shape (2, 2, 2)", "expected (B,)")
    ),
    "NaN in targets": Bad(
        lambda _: plan(torch.tensor([[0.0, NAN], [1.0, 0.0]]), num_classes=2),
        ValueError,
        ("targets", "NaN", "clean the data"),
    ),
    "no target rows": Bad(
        lambda _: plan(torch.zeros(0, dtype=torch.long)), ValueError, ("targets", "shape (0,)", "B >= 1")
    ),
    "targets a list": Bad(lambda _: plan([0, 1]), TypeError, ("targets", "list", "torch.Tensor")),
    # plan lifecycle
    "plan armed twice without a forward": Bad(
        armed_twice, ValueError, ("plan of step 0", "never used", "once after each mixer.plan(y)")
    ),
    "plan after close": Bad(plan_after_close, ValueError, ("HookMixer is closed", "create a new one")),
    "state_dict of other layers": Bad(
        state_of_other_layers, ValueError, ("layers=('0',)", "layers=('2',)", "same settings")
    ),
    # fit
    "model with nothing to train": Bad(
        lambda _: fit_small(nn.Linear(3, 2).requires_grad_(False)),
        ValueError,
        ("model (Linear)", "requires_grad=True", "requires_grad_(True)"),
    ),
    "epochs 0": Bad(lambda _: FitConfig(epochs=0), ValueError, ("epochs=0", "int >= 1")),
    "lr NaN": Bad(lambda _: FitConfig(lr=NAN), ValueError, ("lr=nan", "finite number > 0")),
    "FitConfig alpha NaN": Bad(
        lambda _: FitConfig(mixing=MixSettings(alpha=NAN)), ValueError, ("alpha=nan", "finite", "alpha=0.4")
    ),
    "FitConfig lam_mode": Bad(
        lambda _: FitConfig(mixing=MixSettings(lam_mode="row")), ValueError, ("lam_mode='row'", "'sample'")
    ),
    "FitConfig switch_prob": Bad(
        lambda _: FitConfig(mixing=MixSettings(cutmix_alpha=1.0, switch_prob=2)), ValueError, ("switch_prob=2",)
    ),
    "FitConfig label_smoothing": Bad(
        lambda _: FitConfig(mixing=MixSettings(label_smoothing=1.0)), ValueError, ("label_smoothing=1.0", "[0, 1)")
    ),
    "fit alpha negative": Bad(
        lambda _: fit_small(config=FitConfig(epochs=1, mixing=MixSettings(alpha=-1.0))),
        ValueError,
        ("alpha=-1.0", "alpha=0.4"),
    ),
    "val labels out of range": Bad(
        lambda _: fit_small(val_y=torch.tensor([0, 7])),
        ValueError,
        ("val_labels", "[0, 7]", "num_classes=2", "relabel"),
    ),
    "float train labels": Bad(
        lambda _: fit_small(train_y=torch.tensor([0.0, 1.0, 0.0, 1.0])),
        ValueError,
        ("train_labels", "torch.float32", "labels.long()"),
    ),
    "inputs and labels disagree": Bad(
        lambda _: fit_small(train_x=torch.randn(5, 3)),
        ValueError,
        ("train_inputs (5, 3)", "4 train_labels", "(V, N, ...)"),
    ),
    "head narrower than num_classes": Bad(
        lambda _: fit_small(nn.Linear(3, 3), num_classes=5),
        ValueError,
        ("model returns (", "num_classes=5", "head with 5 outputs"),
    ),
    "num_classes missing": Bad(lambda _: fit_small(num_classes=None), ValueError, ("num_classes=None", "int >= 2")),
    "resume without a directory": Bad(
        lambda _: fit_small(resume=True), ValueError, ("resume=True", "checkpoint_dir=DIR")
    ),
    "checkpoint of another head shape": Bad(
        checkpoint_of_other_head, ValueError, ("another head shape", "0.weight", "fit with another checkpoint_dir")
    ),
    "checkpoint of other settings": Bad(
        checkpoint_of_other_settings, ValueError, ("'alpha': (0.4, 1.0)", "resume with the same settings")
    ),
    # feature cache
    "cache of another model": Bad(
        load_cache_for(model="test:other"),
        ValueError,
        ("model='test:pool'", "model='test:other'", "extract into another directory"),
    ),
    "cache of another layer": Bad(
        load_cache_for(layer="fc"), ValueError, ("layer='pool'", "layer='fc'", "extract into another directory")
    ),
    "cache of another transform": Bad(
        load_cache_for(transform="Resize:1"),
        ValueError,
        ("transform='none'", "transform='Resize:1'", "extract into another directory"),
    ),
    "truncated cache shard": Bad(
        truncated_shard, ValueError, ("shard-00000.safetensors", "truncated", "once no process uses it")
    ),
    "feature dtype int64": Bad(integer_features, ValueError, ("dtype=torch.int64", "torch.float16")),
    # image folders
    "data not a directory": Bad(
        lambda p: load_image_folder(p / "missing", (3, 16, 16)),
        ValueError,
        ("--data", "missing", "not a directory", "one sub-folder per class"),
    ),
    "empty image folder": Bad(empty_folder, ValueError, ("--data", "holds no images", "root/<class>/<image>")),
    "single-class folder": Bad(
        lambda p: load_image_folder(folder(p, classes=("only",)), (3, 16, 16)),
        ValueError,
        ("--data", "single class ['only']", "at least two sub-folders"),
    ),
    "class with one image": Bad(single_image_class, ValueError, ("class 'dog'", "1 image", "at least 2")),
    "unreadable image": Bad(unreadable_image, ValueError, ("unreadable image", "3.png", "Remove or replace")),
    "two input channels": Bad(
        lambda p: load_image_folder(folder(p), (2, 16, 16)), ValueError, ("--input-size 2 16 16", "2 channels", "C=3")
    ),
    "val_fraction 1.5": Bad(
        lambda p: load_image_folder(folder(p), (3, 16, 16), val_fraction=1.5),
        ValueError,
        ("val_fraction=1.5", "(0, 1)", "val_fraction=0.2"),
    ),
    # models and weights
    "unknown model name": Bad(
        lambda _: resolve_model("resnet5"),
        ValueError,
        ("model='resnet5'", "not a torchvision or timm model", "closest names: resnet50"),
    ),
    "unknown library prefix": Bad(
        lambda _: resolve_model("keras:resnet50"),
        ValueError,
        ("model='keras:resnet50'", "'keras'", "'torchvision:' or 'timm:'"),
    ),
    "missing weights file": Bad(
        lambda p: create_model("resnet18", weights=p / "none.pt"),
        FileNotFoundError,
        ("weights file", "none.pt", "does not exist"),
    ),
    "weights of another architecture": Bad(
        lambda p: create_model("resnet34", weights=torch_weights(p, resnet().state_dict())),
        ValueError,
        ("weights file", "w.pt", "Missing key(s)", "give weights saved from resnet34"),
    ),
    "weights not a state dict": Bad(
        lambda p: create_model("resnet18", weights=torch_weights(p, [1, 2])),
        ValueError,
        ("weights file", "state dict of tensors", "model.state_dict()"),
    ),
    # metrics
    "metric labels out of range": Bad(
        lambda _: evaluate(torch.randn(3, 4), torch.tensor([0, 1, 9])),
        ValueError,
        ("y must hold class indices", "[0, 9]", "relabel y"),
    ),
    "non-tensor layer output": Bad(
        lambda _: train_step(Probe(DictOut()), "side", torch.randn(4, 3)),
        ValueError,
        ("layer 'side'", "dict holding no tensor", "choose a layer"),
    ),
    "layer output without a batch dim": Bad(
        lambda _: train_step(Probe(ScalarOut()), "side", torch.randn(4, 3)),
        ValueError,
        ("layer 'side'", "tensors ()", "choose a layer"),
    ),
}


def check(case: Bad, tmp_path: Path) -> None:
    with pytest.raises(Exception) as info:
        case.call(tmp_path)
    message = str(info.value)
    expected = UsageError if case.error is ValueError else case.error  # hookmix's ValueErrors are UsageErrors
    assert type(info.value) is expected, f"{type(info.value).__name__}: {message}"
    missing = [part for part in case.says if part not in message]
    assert not missing, f"the message does not name {missing}: {message}"
    assert "\n" not in message


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_naming_argument_value_and_fix(name: str, tmp_path: Path) -> None:
    check(CASES[name], tmp_path)


def cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``hookmix ARGS``; it must exit with code 2 and print one error line, last, and no traceback."""
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert info.value.code == 2, err
    assert "Traceback" not in err and [line for line in lines if "error:" in line] == lines[-1:], err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err  # argparse prints its usage above the line
    return lines[-1]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("cli") / "imgs")


CLI_CASES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "epochs 0": (["--data", "digits", "--epochs", "0"], ("--epochs", "0 must be >= 1")),
    "batch size not a number": (["--data", "digits", "--batch-size", "x"], ("--batch-size", "'x' is not an integer")),
    "lr 0": (["--data", "digits", "--lr", "0"], ("argument --lr", "0 must be > 0")),
    "unknown model": (["--model", "resnet5", "--layer", "layer4"], ("--model resnet5", "closest names: resnet50")),
    "unknown layer": (["--model", "resnet18", "--layer", "layer5"], ("--layer layer5", "closest names: layer4")),
    "alpha NaN": (
        ["--model", "resnet18", "--layer", "layer4", "--alpha", "nan", "--epochs", "1"],
        ("argument --alpha", "nan is not a finite number"),
    ),
    "exclude a class the folder lacks": (
        ["--model", "resnet18", "--layer", "layer4", "--exclude-classes", "9"],
        ("--exclude-classes [9]", "in [0, 2]", "list only existing"),
    ),
    "input size the model cannot take": (
        ["--model", "resnet18", "--layer", "layer4", "--input-size", "1", "32", "32"],
        ("--input-size 1 32 32", "does not fit --model resnet18", "give the C H W"),
    ),
    "pretrained and weights": (
        ["--model", "resnet18", "--pretrained", "--weights", "w.pt"],
        ("--weights", "not allowed with argument --pretrained"),
    ),
    "model with digits": (["--data", "digits", "--model", "resnet18"], ("--data digits", "drop --model resnet18")),
    "shots beyond the data": (["--data", "digits", "--shots", "1000"], ("k", "1000", "[1, 100]")),
    "no data": (["--model", "resnet18"], ("required", "--data")),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_usage_error_is_one_line_with_exit_code_2(
    name: str, image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, says = CLI_CASES[name]
    data = [] if "--data" in args or name == "no data" else ["--data", str(image_dir)]
    size = [] if "--input-size" in args else ["--input-size", "3", "32", "32"]
    line = cli_error(["finetune", *data, *args, *size, "--out", str(tmp_path / "out"), "--quiet"], capsys)
    missing = [part for part in says if part not in line]
    assert not missing, f"{line!r} does not name {missing}"


def test_cli_unknown_command_and_out_as_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "invalid choice: 'frobnicate'" in cli_error(["frobnicate"], capsys)
    out = tmp_path / "taken"
    out.write_text("a file")
    line = cli_error(["finetune", "--data", "digits", "--out", str(out), "--quiet"], capsys)
    assert line == f"hookmix: error: --out {out} is a file; give a directory (it is created when missing)."


def test_cli_weights_of_another_architecture(
    image_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = torch_weights(tmp_path, resnet().state_dict())
    line = cli_error(
        [
            "finetune",
            "--data",
            str(image_dir),
            "--model",
            "resnet34",
            "--layer",
            "layer4",
            "--weights",
            str(weights),
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ],
        capsys,
    )
    assert f"weights file {weights} does not fit this ResNet" in line and "resnet34" in line
