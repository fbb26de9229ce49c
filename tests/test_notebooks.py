"""The notebooks run top to bottom offline (nbclient, a real kernel) and show what they claim; the
committed copies carry no outputs, so they stay small and diff cleanly."""

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="executing notebooks needs `pip install hookmix[dev]`")
nbclient = pytest.importorskip("nbclient", reason="executing notebooks needs `pip install hookmix[dev]`")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# what each notebook must print, checked in its executed outputs
EXPECTED = {
    "01_quickstart": ["max |mixed - formula| =", "hooks left on layer3: 0", "closest names: layer3"],
    "02_head_only_finetuning": ["| k/class | epochs | mixup |"],
    "03_layer_sweep": ["| manifold (all) |", "| no mixup |", "one step, same plan: max |gradient difference| ="],
    "04_tabular_mixing": ["mixed layers: ('embeds.0',", "| yes |", "| no |"],
}


def stream_text(nb: "nbformat.NotebookNode") -> str:
    return "".join(
        out.get("text", "") + "".join(out.get("data", {}).get("text/plain", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def test_every_notebook_is_checked() -> None:
    assert [p.stem for p in NOTEBOOKS] == sorted(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path: Path) -> None:
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"strip the outputs of {path.name}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path) -> None:
    work = tmp_path / "notebooks"  # outputs go to a scratch copy of the layout: notebooks/ next to examples/
    work.mkdir()
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, if any cell fails
    text = stream_text(nb)
    for expected in EXPECTED[path.stem]:
        assert expected in text, f"{path.name} did not print {expected!r}:\n{text[-2000:]}"
