"""The package's shape: lazy public names that no submodule import can shadow, the library apart from the
application (also in its messages: no flag of the command line, ``test_the_library_names_no_flag_of_the_command_line``
catches a ``--cache`` / ``--out`` written into a library message), and no import cycle."""

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import hookmix

ROOT = Path(__file__).resolve().parents[1] / "hookmix"


def test_public_names_survive_importing_every_submodule() -> None:
    """Importing ``hookmix.x`` sets the package attribute ``x`` to the module: a public name equal to a
    module name (``split`` in ``split.py``) would then resolve to the module instead."""
    for info in pkgutil.walk_packages(hookmix.__path__, "hookmix."):
        if not info.name.startswith("hookmix.integrations."):  # those need their framework
            importlib.import_module(info.name)
    for name in hookmix.__all__:
        value = getattr(hookmix, name)
        assert not isinstance(value, type(hookmix)), f"hookmix.{name} is a module"


def test_import_hookmix_loads_no_torch() -> None:
    code = "import sys, hookmix; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def imports_of(path: Path) -> set[str]:
    """The hookmix modules ``path`` imports at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hookmix"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("hookmix"))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_library_never_imports_the_app_and_has_no_import_cycle() -> None:
    graph = {module_name(p): imports_of(p) for p in ROOT.rglob("*.py")}
    app = ("hookmix.app", "hookmix.__main__")  # __main__ is the command's entry point, like the hookmix script
    library = {name: deps for name, deps in graph.items() if not name.startswith(app)}
    for name, deps in library.items():
        assert not any(dep.startswith("hookmix.app") for dep in deps), f"{name} imports the app: {deps}"

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for dep in graph.get(start, ()):
            if dep == target or (dep not in seen and (seen.add(dep) or reaches(dep, target, seen))):
                return True
        return False

    cycles = [name for name in graph if name != "hookmix" and reaches(name, name, set())]
    assert cycles == [], f"modules in an import cycle: {cycles}"


LAYERS = ("core", "graph", "mixing", "evaluation", "headonly", "integrations", "app")


def layer_of(module: str) -> int | None:
    """The index in LAYERS of ``hookmix.<layer>...``; None for the package root's own modules."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_each_layer_imports_only_the_layers_below_it() -> None:
    """helpers < graph < mixing < evaluation < head-only < integrations < app: a module may import its own
    layer and those before it, never one after (the graph must not know about mixing, nor mixing about the
    cache)."""
    upward = []
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        own = layer_of(name)
        if own is None:
            continue
        for dep in imports_of(path):
            if (theirs := layer_of(dep)) is not None and theirs > own:
                upward.append(f"{name} imports {dep}")
        assert path.parent == ROOT / LAYERS[own] or path.parent.parent == ROOT / LAYERS[own], path
    assert upward == [], "imports that point up the layers: " + "; ".join(sorted(upward))


def test_the_root_holds_few_modules_and_every_module_sits_in_a_layer() -> None:
    root_modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert root_modules == ["__init__.py", "__main__.py"]
    assert sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(LAYERS)


def test_the_tests_mirror_the_layers() -> None:
    """Each layer's tests live in tests/<layer>/; the root keeps the cross-cutting suites only."""
    tests = Path(__file__).resolve().parent
    for layer in LAYERS:
        assert any((tests / layer).glob("test_*.py")), f"tests/{layer}/ has no tests"
    for path in tests.glob("*/test_*.py"):
        assert path.parent.name in LAYERS, f"{path} is in a folder that is not a layer"


def test_the_public_api_is_one_short_list() -> None:
    """``_WHERE`` is the only list: ``__all__`` is its names, each resolves to the object in the module it
    names, and the API stays the 15-25 names a user starts from."""
    assert hookmix.__all__ == [*hookmix._WHERE, "__version__"]
    assert 15 <= len(hookmix._WHERE) <= 25, sorted(hookmix._WHERE)
    for name, module in hookmix._WHERE.items():
        assert getattr(hookmix, name) is getattr(importlib.import_module(f"hookmix.{module}"), name)
    assert len({name.lower() for name in hookmix._WHERE}) == len(hookmix._WHERE), "names differing only in case"


def test_every_warning_hookmix_gives_derives_from_hookmix_warning() -> None:
    """``filterwarnings(category=hookmix.HookmixWarning)`` reaches them all."""
    warnings_found = []
    for info in pkgutil.walk_packages(hookmix.__path__, "hookmix."):
        if info.name.startswith("hookmix.integrations."):
            continue
        for value in vars(importlib.import_module(info.name)).values():
            if isinstance(value, type) and issubclass(value, Warning) and value.__module__.startswith("hookmix"):
                warnings_found.append(value)
    assert len(set(warnings_found)) >= 4
    assert all(issubclass(w, hookmix.HookmixWarning) for w in warnings_found), warnings_found


def test_functions_and_classes_stay_small() -> None:
    """No function body over 60 lines (its docstring aside: argument docs may be long) and no class over 300
    lines, so each piece does one job a maintainer can read at once."""
    too_long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1
                lines = node.end_lineno - (body[1] if has_doc else body[0]).lineno + 1
                if lines > 60:
                    too_long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
            elif isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                too_long.append(
                    f"{path.name}:{node.lineno} class {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                )
    assert too_long == [], too_long


def docstrings(tree: ast.AST) -> set[int]:
    """The ``id`` of each docstring constant in ``tree`` (module, class and function docstrings)."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, kinds) and node.body and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip


def test_the_library_names_no_flag_of_the_command_line() -> None:
    """Issue 22 item 6: the library is called from Python (``path=``, ``checkpoint_dir=``), so no string of its
    code — a message, or a piece of one — names the command's ``--cache`` or ``--out``; the app names its flags
    (``hookmix.app``: ``check_location(flag, ...)``, ``_with_flags``). Docstrings may describe the command."""
    found = []
    for path in ROOT.rglob("*.py"):
        if path.is_relative_to(ROOT / "app") or path.name == "__main__.py":
            continue
        tree = ast.parse(path.read_text())
        skip = docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                if re.search(r"--(cache|out)\b", node.value):
                    found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {node.value!r}")
    assert found == [], found
