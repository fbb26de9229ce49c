"""Write docs/api.md, the public API of hookmix from its signatures and docstrings, and hookmix/__init__.pyi,
the type stub that shows IDEs and type checkers the lazily loaded names; both from ``hookmix._WHERE``.

    python docs/gen_api.py          # rewrite both
    python docs/gen_api.py --check  # exit 1 if either is out of date (tests/test_docs.py runs this)

Public means: the names in ``hookmix.__all__`` and in the ``__all__`` of the public submodules below; for
classes, their public methods and properties defined in hookmix.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

API_MD = Path(__file__).with_name("api.md")
STUB = Path(__file__).resolve().parents[1] / "hookmix" / "__init__.pyi"
MODULES = (
    "hookmix",
    "hookmix.headonly.distributed",
    "hookmix.integrations.timm",
    "hookmix.integrations.lightning",
    "hookmix.integrations.fastai",
)
ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def signature(obj: object) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return ADDRESS.sub("", text)


def doc(obj: object) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else "*(no docstring)*"


def members(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties defined by ``cls`` itself (or its hookmix bases), in source order."""
    found = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith("hookmix"):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and (
                inspect.isfunction(value) or isinstance(value, (property, classmethod, staticmethod))
            ):
                found[name] = value
    return list(found.items())


def render_object(module: str, name: str, obj: object) -> list[str]:
    if isinstance(obj, str):  # __version__
        return []
    kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "constant"
    lines = [f"### `{module}.{name}`", ""]
    if kind == "constant":
        return lines + [f"`{obj!r}`", ""]
    lines += ["```python", f"{name}{signature(obj)}", "```", "", doc(obj), ""]
    if kind == "class":
        for member, value in members(obj):
            if isinstance(value, property):
                lines += [f"- **`{member}`** (property) — {doc(value).splitlines()[0]}"]
            else:
                function = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
                lines += ["", f"#### `{name}.{member}{signature(function)}`", "", doc(function)]
        lines.append("")
    return lines


def render() -> str:
    lines = [
        "# hookmix API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py`; `make test` fails when it is out of date.",
        "",
    ]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        lines += [f"## `{module_name}`", "", doc(module).split("\n\n")[0], ""]
        for name in module.__all__:
            lines += render_object(module_name, name, getattr(module, name))
    return "\n".join(lines).rstrip() + "\n"


def render_stub() -> str:
    """``from <module> import <name> as <name>`` for each public name, in ``_WHERE``'s order."""
    import hookmix

    lines = ['"""Type stub of hookmix\'s lazily loaded public names, written by docs/gen_api.py from _WHERE."""', ""]
    lines += [f"from hookmix.{module} import {name} as {name}" for name, module in hookmix._WHERE.items()]
    lines += ["", "__version__: str", "__all__ = [", *[f"    {name!r}," for name in hookmix.__all__], "]"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/api.md differs from the docstrings")
    args = parser.parse_args()
    outputs = {API_MD: render(), STUB: render_stub()}
    if args.check:
        stale = [str(path) for path, text in outputs.items() if not path.exists() or path.read_text() != text]
        if stale:
            print(f"{', '.join(stale)} out of date: run `python docs/gen_api.py` and commit.", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs.items():
        path.write_text(text)
        print(f"wrote {path} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
