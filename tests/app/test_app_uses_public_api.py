"""The application is a user of the library: it imports the library's public modules and names only, so a
library module can rename or rework what it keeps private without breaking the CLI.

Bug this catches: the app reaching into a private module or name of the library (``from
hookmix.headonly._cache_format import ...``, ``from hookmix.evaluation.plots import _save``) —
``test_the_app_imports_no_private_library_module_or_name``. Private names of the app's own modules
(``hookmix.app.finetune_job``'s phases, which ``sweep_job`` reuses) stay allowed: they are one program.
"""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "hookmix" / "app"


def private_library_imports(source: str) -> list[str]:
    """``module`` or ``module.name`` for each import of ``source`` that names a ``_``-prefixed part of
    the library outside ``hookmix.app``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hookmix"):
            pairs = [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            pairs = [(alias.name, "") for alias in node.names if alias.name.startswith("hookmix")]
        else:
            continue
        for module, name in pairs:
            if module == "hookmix.app" or module.startswith("hookmix.app."):
                continue
            private = any(part.startswith("_") for part in module.split(".")) or name.startswith("_")
            if private:
                found.append(f"{module}.{name}" if name else module)
    return found


def test_the_detector_sees_private_modules_and_names() -> None:
    source = (
        "from hookmix.headonly._cache_format import bytes_per_example\n"
        "import hookmix.core._x\n"
        "def f():\n    from hookmix.evaluation.plots import _save, plot_history\n"
        "from hookmix.app.finetune_job import _prepare\n"
        "from hookmix.headonly.cache import CacheKey\n"
    )
    assert private_library_imports(source) == [
        "hookmix.headonly._cache_format.bytes_per_example",
        "hookmix.core._x",
        "hookmix.evaluation.plots._save",
    ]


def test_the_app_imports_no_private_library_module_or_name() -> None:
    found = {path.name: private_library_imports(path.read_text()) for path in sorted(APP.glob("*.py"))}
    assert {name: names for name, names in found.items() if names} == {}
