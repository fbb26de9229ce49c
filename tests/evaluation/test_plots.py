import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.image import imread  # noqa: E402

import hookmix.evaluation.plots  # noqa: E402
from hookmix.evaluation.metrics import reliability  # noqa: E402
from hookmix.evaluation.plots import _beta_density, plot_history, plot_lambda_hist, plot_reliability  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(n_epochs: int, offset: float) -> list[dict[str, float]]:
    return [
        {
            "epoch": e,
            "train_loss": 1.5 / (e + 1) + offset,
            "val_nll": 1.2 / (e + 1) + offset,
            "val_accuracy": 0.5 + 0.05 * e,
            "val_ece": 0.1 / (e + 1),
            "lr": 0.1,
        }
        for e in range(n_epochs)
    ]


def _assert_png(path: Path, written: Path) -> np.ndarray:
    assert written == path and path.is_file()
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000
    assert plt.get_fignums() == []
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    pixels = imread(path)
    assert pixels.std() > 0.05  # something was drawn, not a blank canvas
    return pixels


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the plot functions save, kept for inspecting what they show (the data, not the pixels)."""
    figures: list = []
    save = hookmix.evaluation.plots.save_figure

    def keep(figure, path):
        figures.append(figure)
        return save(figure, path)

    monkeypatch.setattr(hookmix.evaluation.plots, "save_figure", keep)
    return figures


def test_plot_history_single_and_overlaid(tmp_path: Path, drawn: list) -> None:
    single = tmp_path / "one" / "history.png"
    pixels = _assert_png(single, plot_history(_history(5, 0.0), single))
    assert pixels.shape[:2] == (round(6.5 * 120), 9 * 120)
    overlaid = tmp_path / "two" / "history.png"
    runs = {"baseline": _history(5, 0.0), "mixup": _history(3, 0.2)}
    _assert_png(overlaid, plot_history(runs, str(overlaid)))
    panels = drawn[1].axes
    titles = ["train loss", "validation NLL", "validation accuracy", "validation ECE"]
    assert [ax.get_title() for ax in panels] == titles
    for ax, key in zip(panels, ("train_loss", "val_nll", "val_accuracy", "val_ece")):
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == ["baseline", "mixup"]
        for line, records in zip(lines, runs.values()):
            assert list(line.get_xdata()) == [r["epoch"] for r in records]
            assert np.allclose(line.get_ydata(), [r[key] for r in records])


def test_plot_reliability(tmp_path: Path, drawn: list) -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (300,), generator=gen)
    sharp = torch.randn(300, 4, generator=gen) * 4
    sharp[torch.arange(300), y] += 3
    curves = {"sharp": reliability(sharp, y), "soft": reliability(sharp / 4, y)}
    path = tmp_path / "reliability.png"
    _assert_png(path, plot_reliability(curves, path))
    diagonal, *lines = drawn[0].axes[0].get_lines()
    assert list(diagonal.get_xdata()) == list(diagonal.get_ydata()) == [0.0, 1.0]
    for line, (label, curve) in zip(lines, curves.items()):
        filled = curve.count > 0
        assert line.get_label() == f"{label} (ECE {curve.ece:.3f})"
        assert np.allclose(line.get_xdata(), curve.confidence[filled].numpy())
        assert np.allclose(line.get_ydata(), curve.accuracy[filled].numpy())
    assert curves["sharp"].ece != curves["soft"].ece


@pytest.mark.parametrize("alpha", [None, 0.2, 1.0, 2.0])
def test_plot_lambda_hist(tmp_path: Path, alpha: float | None, drawn: list) -> None:
    rng = np.random.default_rng(0)
    lams = torch.as_tensor(rng.uniform(size=1000) if alpha is None else rng.beta(alpha, alpha, size=1000))
    path = tmp_path / "lams.png"
    _assert_png(path, plot_lambda_hist(lams, path, alpha=alpha))
    ax = drawn[0].axes[0]
    expected, _ = np.histogram(lams.numpy(), bins=np.linspace(0.0, 1.0, 31), density=True)
    assert np.allclose([bar.get_height() for bar in ax.patches], expected)
    lines = ax.get_lines()
    assert len(lines) == (alpha is not None)
    if alpha is not None:
        assert np.allclose(lines[0].get_ydata(), _beta_density(lines[0].get_xdata(), alpha))


def test_plot_lambda_hist_accepts_numpy(tmp_path: Path) -> None:
    path = tmp_path / "lams.png"
    _assert_png(path, plot_lambda_hist(np.random.default_rng(0).beta(0.4, 0.4, size=(50, 2)), path, alpha=0.4))


def test_beta_density_matches_closed_forms() -> None:
    x = np.array([0.1, 0.25, 0.5, 0.9])
    assert np.allclose(_beta_density(x, 1.0), 1.0)
    assert np.allclose(_beta_density(x, 2.0), 6 * x * (1 - x))
    assert np.allclose(_beta_density(x, 0.5), 1 / (math.pi * np.sqrt(x * (1 - x))))
    # integrates to 1
    grid = np.linspace(1e-6, 1 - 1e-6, 200_001)
    assert np.trapezoid(_beta_density(grid, 3.5), grid) == pytest.approx(1.0, abs=1e-6)


def test_existing_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "lams.png"
    path.write_bytes(b"old")
    plot_lambda_hist(torch.full((10,), 0.5), path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_bad_inputs(tmp_path: Path) -> None:
    png = tmp_path / "x.png"
    with pytest.raises(ValueError, match=r"must end in \.png"):
        plot_lambda_hist(torch.rand(5), tmp_path / "x.pdf")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        plot_lambda_hist(torch.tensor([0.5, 1.5]), png)
    with pytest.raises(ValueError, match="empty"):
        plot_lambda_hist(torch.tensor([]), png)
    with pytest.raises(ValueError, match="alpha"):
        plot_lambda_hist(torch.rand(5), png, alpha=0.0)
    with pytest.raises(TypeError, match="lams"):
        plot_lambda_hist([0.5], png)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="val_ece"):
        plot_history([{"epoch": 0, "train_loss": 1.0, "val_nll": 1.0, "val_accuracy": 0.5}], png)
    with pytest.raises(ValueError, match=r"history\['a'\] must be a non-empty list"):
        plot_history({"a": []}, png)
    with pytest.raises(TypeError, match=r"curves\['m'\]"):
        plot_reliability({"m": {"confidence": [0.5]}}, png)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_reliability({}, png)
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"pip install hookmix\[plots\]"):
        plot_lambda_hist(torch.rand(5, generator=torch.Generator().manual_seed(0)), tmp_path / "x.png")


def test_core_import_does_not_load_matplotlib() -> None:
    code = "import sys, hookmix.evaluation.plots, hookmix.evaluation.metrics; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
