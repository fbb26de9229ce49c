"""``hookmix.headonly.sweep`` and ``hookmix sweep``: every cell of a grid trained together is the run ``fit`` (and
``finetune``) makes alone, and the summary says what the numbers say.

Bugs a maintainer could plausibly make here, and the test that catches each:
- a cell drawing another seed's data order or views, or its mix plans from a generator seeded otherwise than
  fit's mixer, or stepping AdamW / the cosine schedule with another head's lr, or mixing a baseline (α = 0)
  cell: ``test_stacked_cells_equal_fit_alone`` (final metrics, weights and λ against ``fit``, ≤ 1e-4);
- per-row λ (``lam_mode="sample"``, ``dominant``) mixed as one λ per batch:
  ``test_stacked_cells_equal_fit_alone`` (its ``sample`` case);
- a head that is not one ``Linear`` taken for one (its logits mixed instead of its input), or the linear
  path's per-seed GEMM giving a head another seed's batch or another head's weights:
  ``test_stacked_cells_equal_fit_alone`` (``mlp-vmap`` and ``linear-logit-mixing``); the same on a grid that is
  not a full product (a group whose seeds are not all there, or not equally often, taken as one batched GEMM,
  or its seeds' batches mixed up): ``test_a_ragged_grid_of_linear_heads_equals_fit_alone``;
- a step's batch gathered with the view drawn for another row (each example's view is drawn by its index, not
  its position in the epoch's order): ``test_stacked_cells_equal_fit_alone`` (two cached views);
- an MLP head (BatchNorm, dropout) stacked with every cell drawing one seed's dropout masks, its running
  statistics not written back, CutMix cells interpolated instead of pasting their boxes (or the targets not
  following the box's area), multi-hot targets left unmixed: ``test_stacked_mlp_heads_equal_fit_alone``;
- a head whose dropout cannot be drawn as fit draws it stacked anyway:
  ``test_heads_that_do_not_stack_are_trained_by_fit``;
- the heads ``hookmix.split`` cuts (``--head model``) never stacked because every copy of a GraphModule has a
  class of its own: ``test_heads_split_from_a_model_are_stacked_and_equal_fit_alone``;
- α = 0 left out, or the baseline mixing: ``test_the_grid_always_has_the_baseline_first``;
- the paired difference taken unpaired (another seed's baseline), the CI's t quantile wrong, a verdict
  calling a higher NLL "better", or the warning signs not raised:
  ``test_paired_differences_verdicts_and_warnings``;
- a CutMix cell compared with a baseline of its own cutmix α instead of no mixing, records without the cutmix α
  or the multi-label metrics, a CutMix sweep caching pooled features, the grid's CutMix cells drifting from
  ``finetune --cutmix-alpha``: ``test_a_multilabel_cutmix_sweep_of_mlp_heads_equals_finetune``;
- ``hookmix.sweep`` mixing up layers (another layer's features or heads), a summary of other records, ``best``
  not the lowest NLL, unequal layer sets accepted: ``test_the_python_api_sweeps_layers_and_each_cell_is_fit``;
- ``hookmix sweep`` cells drifting from ``finetune`` (another cache, head init, split or config), the best
  cell not written as a run: ``test_the_sweep_cli_cells_equal_finetune_runs``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hookmix.app.cli import main
from hookmix.headonly.heads import build_head
from hookmix.headonly.sweep import (
    fit_grid,
    grid_configs,
    paired_differences,
    stackable,
    summary,
    verdicts,
    warnings_of,
)
from hookmix.headonly.training import FitConfig, fit
from hookmix.mixing.settings import MixSettings

TOLERANCE = 1e-4  # measured: the largest difference against fit alone is ~2e-7 (batched matmuls' rounding)


def _data(views: int = 2) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 24, generator=generator)
    y = torch.randint(0, 5, (203,), generator=generator)  # 203 rows, batch 16: a short last batch
    x = centers[y] + torch.randn(views, 203, 24, generator=generator)
    vy = torch.randint(0, 5, (90,), generator=generator)
    vx = centers[vy] + torch.randn(90, 24, generator=generator)
    return x, y, vx, vy


def _linear(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(24, 5))


def _two_layer(seed: int) -> nn.Module:
    """A head without buffers or dropout that is not affine: stacked under vmap, never as logit mixing."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5))


def _fit_alone(make_head: Callable[[int], nn.Module], configs: list[FitConfig], *data: torch.Tensor) -> list:
    """Each cell trained alone by ``fit`` on ``data`` (``x, y, vx, vy``): ``(head, FitResult)`` per config."""
    fitted = []
    for config in configs:
        alone = make_head(config.seed)
        fitted.append((alone, fit(alone, "input", *data, config, num_classes=5, progress=False)))
    return fitted


def _largest_difference(cells: list, fitted: list) -> float:
    worst = 0.0
    for (head, result), (alone, expected) in zip(cells, fitted):
        assert result.history[-1].keys() == expected.history[-1].keys()
        for ours, theirs in zip(result.history, expected.history):
            worst = max(worst, *(abs(ours[k] - theirs[k]) for k in theirs))
        worst = max(worst, *((a - b).abs().max().item() for a, b in zip(head.parameters(), alone.parameters())))
        assert len(result.lams) == len(expected.lams)
        worst = max(worst, max((abs(a - b) for a, b in zip(result.lams, expected.lams)), default=0.0))
    return worst


@pytest.mark.parametrize("lam_mode", ["batch", "sample"])
@pytest.mark.parametrize("make_head", [_linear, _two_layer], ids=["linear-logit-mixing", "mlp-vmap"])
def test_stacked_cells_equal_fit_alone(lam_mode: str, make_head: type) -> None:
    x, y, vx, vy = _data()
    mixing = MixSettings(lam_mode=lam_mode, dominant=lam_mode == "sample")
    base = FitConfig(epochs=3, batch_size=16, mixing=mixing)
    configs = grid_configs(base, [0.4, 1.0], [1e-2, 3e-3], [0, 1])
    heads = [make_head(c.seed) for c in configs]
    assert {stackable(h, c, x, y) for h, c in zip(heads, configs)} == {""}
    results = fit_grid(heads, configs, x, y, vx, vy, num_classes=5, progress=False)
    fitted = _fit_alone(make_head, configs, x, y, vx, vy)
    assert _largest_difference(list(zip(heads, results)), fitted) <= TOLERANCE
    # the cells differ from each other (a grid of one run repeated would pass the comparison above only if
    # fit did the same): seeds, α and lr each change the result
    finals = {round(r.final["val_nll"], 6) for r in results}
    assert len(finals) == len(configs)


def test_a_ragged_grid_of_linear_heads_equals_fit_alone() -> None:
    """Cells that are not a full α × lr × seed product, in three lr groups: every seed twice (one batched GEMM for
    the group); every seed but seed 2 twice (unequal: one GEMM per seed); seeds 0 and 2 only (seed 2 the third
    seed's batch). Each cell still equals ``fit`` alone."""
    x, y, vx, vy = _data()

    def cells(lr: float, seeds: list[int], keep: Callable[[FitConfig], bool]) -> list[FitConfig]:
        return [c for c in grid_configs(FitConfig(epochs=2, batch_size=16), [0.4], [lr], seeds) if keep(c)]

    configs = (
        cells(1e-2, [0, 1, 2], lambda c: True)
        + cells(3e-3, [0, 1, 2], lambda c: c.mix or c.seed == 2)
        + cells(1e-3, [0, 2], lambda c: c.mix)
    )
    heads = [_linear(c.seed) for c in configs]
    results = fit_grid(heads, configs, x, y, vx, vy, num_classes=5, progress=False)
    fitted = _fit_alone(_linear, configs, x, y, vx, vy)
    assert _largest_difference(list(zip(heads, results)), fitted) <= TOLERANCE


def _split_head(seed: int) -> nn.Module:
    """The head ``hookmix.split`` cuts from a model (a torch.fx GraphModule, as ``--head model`` gives): each copy
    of one gets a class of its own, yet all run one code."""
    from hookmix import split

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 16), nn.Tanh(), nn.Linear(16, 5))
    return split(model, "1")[1]


def test_heads_split_from_a_model_are_stacked_and_equal_fit_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Copies of a split head differ in class but not in code: the grid trains them together (``fit`` is never
    called for a cell) and each equals ``fit`` alone."""
    import hookmix.headonly.sweep as sweep_module

    x, y, vx, vy = _data()
    configs = grid_configs(FitConfig(epochs=2, batch_size=16), [0.4], [1e-2], [0, 1])
    heads = [_split_head(c.seed) for c in configs]
    assert len({type(h) for h in heads}) == len(heads)  # the quirk this guards: one class per copy

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cell was trained alone with fit")

    monkeypatch.setattr(sweep_module, "fit", no_fit)
    results = fit_grid(heads, configs, x, y, vx, vy, num_classes=5, progress=False)
    monkeypatch.undo()
    fitted = _fit_alone(_split_head, configs, x, y, vx, vy)
    assert _largest_difference(list(zip(heads, results)), fitted) <= TOLERANCE


class _ScaledDropout(nn.Module):
    """A head whose dropout sits inside a module of its own: its masks cannot be drawn as fit draws them."""

    def __init__(self) -> None:
        super().__init__()
        self.drop, self.fc = nn.Dropout(0.5), nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


def test_heads_that_do_not_stack_are_trained_by_fit() -> None:
    x, y, vx, vy = _data(views=1)
    configs = grid_configs(FitConfig(epochs=2, batch_size=16, lr=1e-2), [0.4], [1e-2], [0, 1])

    def head(seed: int) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return _ScaledDropout()

    heads = [head(c.seed) for c in configs]
    assert "dropout" in stackable(heads[0], configs[0], x, y)
    results = fit_grid(heads, configs, x[0], y, vx, vy, num_classes=5, progress=False)
    fitted = _fit_alone(head, configs, x[0], y, vx, vy)
    assert _largest_difference(list(zip(heads, results)), fitted) == 0.0


def _maps(multilabel: bool) -> tuple[torch.Tensor, ...]:
    """Conv maps (V=2, 203, 8, 4, 4) of 5 classes; multi-label: one-hot rows with label 0 added to every third."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 8, 4, 4, generator=generator)
    y, vy = torch.randint(0, 5, (203,), generator=generator), torch.randint(0, 5, (90,), generator=generator)
    x = centers[y] + torch.randn(2, 203, 8, 4, 4, generator=generator)
    vx = centers[vy] + torch.randn(90, 8, 4, 4, generator=generator)
    if multilabel:
        y, vy = F.one_hot(y, 5).float(), F.one_hot(vy, 5).float()
        y[::3, 0], vy[::3, 0] = 1.0, 1.0
    return x, y, vx, vy


def _mlp_difference(heads: list, results: list, configs: list, data: tuple, shape: tuple) -> tuple[float, float]:
    """The largest difference of a cell against fit alone: of the history (losses, metrics) and the λ drawn, and
    of the trained state (weights, BatchNorm running statistics) relative to 1 + |fit's|."""
    worst = state = 0.0
    for head, result, config in zip(heads, results, configs):
        alone = build_head("mlp", feature_shape=shape, num_classes=5, seed=config.seed)
        expected = fit(alone, "input", *data, config, num_classes=5, progress=False)
        for ours, theirs in zip(result.history, expected.history, strict=True):
            worst = max(worst, *(abs(ours[k] - theirs[k]) for k in theirs))
        worst = max([worst, *(abs(a - b) for a, b in zip(result.lams, expected.lams, strict=True))])
        for (name, ours), theirs in zip(head.state_dict().items(), alone.state_dict().values()):
            state = max(state, ((ours - theirs).abs() / (1 + theirs.abs())).max().item())
    return worst, state


@pytest.mark.parametrize(
    "shape, mixing, multilabel",
    [
        ((24,), MixSettings(), False),
        ((8, 4, 4), MixSettings(alpha=0.4, cutmix_alpha=1.0), False),
        ((8, 4, 4), MixSettings(lam_mode="sample"), True),
    ],
    ids=["pooled-mixup", "map-cutmix-or-mixup", "map-multilabel-per-row"],
)
def test_stacked_mlp_heads_equal_fit_alone(shape: tuple, mixing: MixSettings, multilabel: bool) -> None:
    """fastai's MLP head (BatchNorm, dropout) stacked: each cell's dropout masks, running statistics, CutMix
    boxes and mixed multi-hot targets are its fit's (measured: history ≤ 9e-7, state ≤ 1e-4 relative, the
    Adam steps of near-zero gradients amplifying the vmapped BatchNorm's rounding)."""
    x, y, vx, vy = _maps(multilabel) if len(shape) == 3 else _data()
    configs = grid_configs(FitConfig(epochs=3, batch_size=16, mixing=mixing), [0.4, 1.0], [1e-2], [0, 1])
    heads = [build_head("mlp", feature_shape=shape, num_classes=5, seed=c.seed) for c in configs]
    assert {stackable(h, c, x, y) for h, c in zip(heads, configs)} == {""}
    results = fit_grid(heads, configs, x, y, vx, vy, num_classes=5, progress=False)
    worst, state = _mlp_difference(heads, results, configs, (x, y, vx, vy), shape)
    assert worst <= TOLERANCE and state <= 1e-3
    assert len({round(r.final["val_nll"], 6) for r in results}) == len(configs)


def test_the_grid_always_has_the_baseline_first() -> None:
    configs = grid_configs(FitConfig(), [1.0, 0.4, 0.4], [3e-3], [0, 1])
    assert [(c.mix, c.mixing.alpha if c.mix else 0.0, c.seed) for c in configs] == [
        (False, 0.0, 0),
        (False, 0.0, 1),
        (True, 0.4, 0),
        (True, 0.4, 1),
        (True, 1.0, 0),
        (True, 1.0, 1),
    ]


def _record(alpha: float, seed: int, nll: float, accuracy: float, train: float, confidence: float) -> dict:
    return {
        "layer": "layer4",
        "head": "linear",
        "alpha": alpha,
        "cutmix_alpha": 0.0,
        "lr": 0.003,
        "seed": seed,
        "train_loss": train,
        "val_nll": nll,
        "val_accuracy": accuracy,
        "val_ece": 0.05,
        "val_confidence": confidence,
    }


def test_paired_differences_verdicts_and_warnings() -> None:
    base_nll, base_acc = [0.50, 0.90, 0.70], [0.80, 0.60, 0.70]  # a large spread over seeds ...
    records = [_record(0.0, s, base_nll[s], base_acc[s], 0.3, base_acc[s]) for s in range(3)]
    # ... but α=0.4 lowers each seed's NLL by 0.05 ± 0.01 (paired: clearly better); accuracy by +0.1, 0, -0.1
    records += [
        _record(0.4, s, base_nll[s] - d, base_acc[s] + a, 1.0, base_acc[s] + a - 0.2)
        for s, d, a in ((0, 0.04, 0.1), (1, 0.05, 0.0), (2, 0.06, -0.1))
    ]
    rows = {row["metric"]: row for row in paired_differences(records)}
    nll, acc = rows["val_nll"], rows["val_accuracy"]
    t = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom
    assert nll["mean"] == pytest.approx(-0.05) and nll["half_width"] == pytest.approx(t * 0.01 / math.sqrt(3))
    assert acc["mean"] == pytest.approx(0.0, abs=1e-12) and acc["half_width"] == pytest.approx(t * 0.1 / math.sqrt(3))
    lines = dict(zip([r["metric"] for r in paired_differences(records)], verdicts(paired_differences(records))))
    assert lines["val_nll"].startswith("α=0.4 at layer4 (linear, lr 0.003): NLL -0.0500 [")
    assert lines["val_nll"].endswith("better than no mixing")
    assert lines["val_accuracy"].endswith("within noise")
    assert lines["val_ece"].endswith("+0.0000 [+0.0000, +0.0000] within noise")
    warned = warnings_of(records)
    assert any(w.startswith("α=0.4") and "training loss 1.0000 above validation loss" in w for w in warned)
    assert any(w.startswith("α=0.4") and "under-confident" in w and "--calibrate" in w for w in warned)
    assert not any(w.startswith("α=0 ") for w in warned)  # the baseline: train < val, confidence = accuracy


def test_the_sweep_cli_cells_equal_finetune_runs(tmp_path: Path, capsys) -> None:
    common = ["--data", "digits", "--epochs", "2", "--quiet", "--cache", str(tmp_path / "cache")]
    sweep = ["sweep", *common, "--layers", "stage2", "--alpha", "0.4", "--seeds", "2", "--out", str(tmp_path / "s")]
    assert main(sweep) == 0
    printed = capsys.readouterr().out
    assert "α=0.4 at stage2 (model, lr 0.03): NLL" in printed
    payload = json.loads((tmp_path / "s" / "sweep.json").read_text())
    cells = {(r["alpha"], r["seed"]): r for r in payload["records"]}
    assert sorted(cells) == [(0.0, 0), (0.0, 1), (0.4, 0), (0.4, 1)]
    worst = 0.0
    for alpha, flags, seed in ((0.4, ["--alpha", "0.4"], 0), (0.0, ["--no-mix"], 0), (0.4, ["--alpha", "0.4"], 1)):
        out = tmp_path / f"f{alpha}-{seed}"
        cell = ["--layer", "stage2", *flags, "--seed", str(seed), "--data-seed", "0", "--out", str(out)]
        assert main(["finetune", *common, *cell]) == 0
        final = json.loads((out / "metrics.json").read_text())["final"]
        worst = max(worst, *(abs(cells[alpha, seed][k] - final[k]) for k in ("val_nll", "val_accuracy", "train_loss")))
    assert worst <= TOLERANCE
    # without --data-seed 0, seed 1 is another sample of the digits task: not the sweep's cell
    other = ["--layer", "stage2", "--alpha", "0.4", "--seed", "1", "--out", str(tmp_path / "other")]
    assert main(["finetune", *common, *other]) == 0
    final = json.loads((tmp_path / "other" / "metrics.json").read_text())["final"]
    assert abs(cells[0.4, 1]["val_nll"] - final["val_nll"]) > 1e-3
    best = payload["best"]
    assert min(r["val_nll"] for r in payload["records"]) == cells[best["alpha"], best["seed"]]["val_nll"]
    run = tmp_path / "s" / "best"
    assert (run / "run.json").is_file() and (run / "head.safetensors").is_file()
    written = json.loads((run / "metrics.json").read_text())["final"]["val_nll"]
    assert written == pytest.approx(cells[best["alpha"], best["seed"]]["val_nll"], abs=1e-12)
    rows = (tmp_path / "s" / "sweep.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("layer,head,alpha,cutmix_alpha,lr,seed")
    assert (tmp_path / "s" / "sweep.png").stat().st_size > 0


def test_one_head_given_for_two_cells_is_refused() -> None:
    x, y, vx, vy = _data(views=1)
    configs = grid_configs(FitConfig(epochs=1, batch_size=16), [0.4], [1e-2], [0])
    head = _linear(0)
    with pytest.raises(ValueError, match="the same module twice"):
        fit_grid([head, head], configs, x[0], y, vx, vy, num_classes=5, progress=False)


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hookmix.app.mosaics import digits_mosaics, write_mosaics

    root = tmp_path_factory.mktemp("mosaics")
    write_mosaics(root, digits_mosaics(60, 40, 0))
    return root


def test_a_multilabel_cutmix_sweep_of_mlp_heads_equals_finetune(mosaics: Path, tmp_path: Path, capsys) -> None:
    """--labels (multi-label) with --cutmix-alpha and --head mlp: the records carry mAP, F1 and the cutmix α, the
    verdicts compare mAP against no mixing, and a CutMix cell is the finetune run of its flags."""
    image = ["--data", str(mosaics), "--model", "digits-cnn", "--input-size", "1", "16", "16", "--quiet"]
    common = [*image, "--labels", str(mosaics / "train.csv"), "--val-labels", str(mosaics / "val.csv")]
    common += ["--epochs", "2", "--head", "mlp", "--cache", str(tmp_path / "cache")]
    grid = ["--layers", "stage2", "--alpha", "0.4", "--cutmix-alpha", "1", "--seeds", "2"]
    assert main(["sweep", *common, *grid, "--out", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    assert "stage2: training 8 mlp heads together" in printed
    assert "cutmix α=1 at stage2 (mlp, lr 0.003): mAP" in printed
    payload = json.loads((tmp_path / "s" / "sweep.json").read_text())
    cells = {(r["alpha"], r["cutmix_alpha"], r["seed"]): r for r in payload["records"]}
    assert sorted(cells) == [(a, c, s) for a in (0.0, 0.4) for c in (0.0, 1.0) for s in (0, 1)]
    assert payload["task"] == "multilabel" and {"val_map", "val_f1"} <= set(cells[0.0, 0.0, 0])
    worst = 0.0
    for alpha, cutmix, seed in ((0.0, 1.0, 1), (0.4, 1.0, 0)):
        out = tmp_path / f"f{alpha}-{cutmix}-{seed}"
        flags = ["--alpha", str(alpha), "--cutmix-alpha", str(cutmix), "--seed", str(seed), "--data-seed", "0"]
        assert main(["finetune", *common, "--layer", "stage2", *flags, "--out", str(out)]) == 0
        final = json.loads((out / "metrics.json").read_text())["final"]
        worst = max(
            worst, *(abs(cells[alpha, cutmix, seed][k] - final[k]) for k in ("val_map", "val_nll", "train_loss"))
        )
    print(f"largest difference against finetune: {worst:.2e}")
    assert worst <= TOLERANCE


def test_the_python_api_sweeps_layers_and_each_cell_is_fit(capsys) -> None:
    """``hookmix.sweep`` on in-memory features of two layers with the MLP head: one record per cell and layer,
    the summary of those records, the best cell on NLL; a cell equals ``fit`` of ``build_head`` alone."""
    import hookmix

    x, y, vx, vy = _data(views=1)
    maps, _, vmaps, _ = _maps(False)
    train, val = {"vec": x[0], "map": maps[0]}, {"vec": vx, "map": vmaps}
    base = FitConfig(epochs=2, batch_size=16)
    found = hookmix.sweep(
        train, y, val, vy, num_classes=5, head="mlp", alphas=[0.4], lrs=[1e-2], seeds=2, base=base, say=print
    )
    assert "vec: training 4 mlp heads together" in capsys.readouterr().out
    assert [(r["layer"], r["alpha"], r["seed"]) for r in found.records] == [
        (layer, a, s) for layer in ("vec", "map") for a in (0.0, 0.4) for s in (0, 1)
    ]
    assert found.summary == summary(found.records) and len(found.summary["verdicts"]) == 2 * 3
    layer, config, head, result = found.best()
    assert result.final["val_nll"] == min(r["val_nll"] for r in found.records)
    alone = build_head("mlp", feature_shape=val["map"].shape[1:], num_classes=5, seed=1)
    cell = next(r for c, _, r in found.cells["map"] if c.seed == 1 and c.mix)
    config = next(c for c, _, _ in found.cells["map"] if c.seed == 1 and c.mix)
    expected = fit(alone, "input", maps[0], y, vmaps, vy, config, num_classes=5, progress=False)
    assert abs(cell.final["val_nll"] - expected.final["val_nll"]) <= TOLERANCE
    with pytest.raises(ValueError, match="give the same layers"):
        hookmix.sweep(train, y, {"vec": vx}, vy, num_classes=5)
