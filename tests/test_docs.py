"""docs/api.md is the docstrings' current text, and the README's commands and figures exist."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_is_in_sync_with_the_docstrings() -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("fastai")
    result = subprocess.run([sys.executable, ROOT / "docs" / "gen_api.py", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_readme_points_only_at_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    paths = set(re.findall(r"\b((?:benchmarks|examples|notebooks|docs|tests)/[\w./-]+\.(?:py|ipynb|md|png))", readme))
    assert paths, "the README should name its scripts and figures"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"
