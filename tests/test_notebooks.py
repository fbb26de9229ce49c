"""The notebooks run top to bottom offline (nbclient, a real kernel) and print what their committed copies show.

The committed notebooks carry their outputs, so a reader on the repository page sees the tables and figures.
The slow test re-executes each one and compares every code cell's printed text (stdout and the plain text of
results and displays) with the committed text: the words exactly, the numbers to 1e-6 (relative or absolute).
The notebooks are seeded and their kernel runs torch on one CPU thread (``OMP_NUM_THREADS=1``: the float sums
do not depend on the number of cores, and these small models run fastest so on a shared machine), so they
repeat bitwise on one machine; the tolerance lets values that are float rounding error themselves (a
``max |difference|`` of 1e-7) differ between machines, while any figure printed with 3 or 4 decimals must be
the same. Images are not compared byte for byte (they change with the matplotlib version): each cell must
display the image types it displayed when committed. What goes to stderr (warnings such as tqdm's about
missing Jupyter widgets, with the path of the environment) depends on the machine, not on the notebook: it is
neither saved nor compared.

After changing a notebook (or when this test reports new numbers on purpose), execute and save it again:
``python tests/test_notebooks.py [NAME ...]`` (all notebooks when no name is given).
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="executing notebooks needs `pip install hookmix[dev]`")
nbclient = pytest.importorskip("nbclient", reason="executing notebooks needs `pip install hookmix[dev]`")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAX_BYTES = 300_000
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
TOLERANCE = 1e-6

# what each notebook must print, checked in its committed and its re-executed outputs
EXPECTED = {
    "01_quickstart": ["max |mixed - formula| =", "hooks left on layer3: 0", "closest names: layer3"],
    "02_head_only_finetuning": [
        "| head | last train loss | accuracy | NLL | ECE |",
        "| head | T | NLL before → after | ECE before → after |",
        "max |logits difference| after reload =",
    ],
    "03_layer_sweep": ["| manifold (all) |", "| no mixup |", "one step, same plan: max |gradient difference| ="],
    "04_tabular_mixing": [
        "mixed layers: ('embeds.0',",
        "category codes reached the embeddings unmixed: True",
        "| yes |",
        "| no |",
    ],
}


def execute(path: Path, scratch: Path) -> "nbformat.NotebookNode":
    """``path`` run top to bottom by a fresh kernel in ``scratch/notebooks``, next to a link to ``examples/`` as
    in the repository, so that the files a notebook writes stay out of the tree."""
    work = scratch / "notebooks"
    work.mkdir()
    (scratch / "examples").symlink_to(ROOT / "examples")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", record_timing=False, resources={"metadata": {"path": str(work)}}
    )
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1"})  # raises CellExecutionError if a cell fails
    return nb


def code_cells(nb: "nbformat.NotebookNode") -> list["nbformat.NotebookNode"]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def printed(cell: "nbformat.NotebookNode") -> str:
    """What a code cell printed: its stdout and the plain text of its results and displays."""
    return "".join(
        out.get("text", "") if out.get("name") == "stdout" else out.get("data", {}).get("text/plain", "")
        for out in cell.outputs
    )


def images(cell: "nbformat.NotebookNode") -> list[str]:
    """The MIME types of the images a code cell displayed, in order."""
    return [mime for out in cell.outputs for mime in out.get("data", {}) if mime.startswith("image/")]


def same_printout(committed: str, fresh: str) -> bool:
    """The same text, numbers equal to ``TOLERANCE`` (relative or absolute)."""
    if NUMBER.split(committed) != NUMBER.split(fresh):
        return False
    return all(
        math.isclose(float(a), float(b), rel_tol=TOLERANCE, abs_tol=TOLERANCE)
        for a, b in zip(NUMBER.findall(committed), NUMBER.findall(fresh))
    )


def test_every_notebook_is_checked() -> None:
    assert [p.stem for p in NOTEBOOKS] == sorted(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_carries_its_outputs(path: Path) -> None:
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size:,} bytes; lower the figures' dpi"
    cells = code_cells(nbformat.read(path, as_version=4))
    counts = [cell.execution_count for cell in cells]
    fix = f"run `python tests/test_notebooks.py {path.stem}` to execute and save it"
    assert counts == list(range(1, len(cells) + 1)), f"{path.name} was not run top to bottom ({counts}); {fix}"
    errors = [out for cell in cells for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{path.name} was saved with an error output; {fix}"
    text = "".join(printed(cell) for cell in cells)
    for expected in EXPECTED[path.stem]:
        assert expected in text, f"the committed {path.name} does not show {expected!r}; {fix}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_prints_its_committed_outputs(path: Path, tmp_path: Path) -> None:
    committed = code_cells(nbformat.read(path, as_version=4))
    fresh = code_cells(execute(path, tmp_path))
    for number, (old, new) in enumerate(zip(committed, fresh), start=1):
        assert same_printout(printed(old), printed(new)), (
            f"{path.name}, code cell {number} printed other text or numbers than its committed output\n"
            f"--- committed:\n{printed(old)}\n--- now:\n{printed(new)}\n"
            f"If the change is intended, run `python tests/test_notebooks.py {path.stem}` and commit the notebook."
        )
        assert images(old) == images(new), f"{path.name}, code cell {number} displayed {images(new)}, not {images(old)}"
    text = "".join(printed(cell) for cell in fresh)
    for expected in EXPECTED[path.stem]:
        assert expected in text, f"{path.name} did not print {expected!r}:\n{text[-2000:]}"


def save_executed(names: list[str]) -> None:
    """Execute the named notebooks (all when none is named) and write them back with their outputs."""
    for path in [p for p in NOTEBOOKS if not names or p.stem in names]:
        with tempfile.TemporaryDirectory() as scratch:
            nb = execute(path, Path(scratch))
        for cell in code_cells(nb):
            cell.outputs = [out for out in cell.outputs if out.get("name") != "stderr"]
        nbformat.write(nb, path)
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    save_executed(sys.argv[1:])
