"""Where the parts meet, arguments are named: a function of more than 4 parameters takes at
most 4 by position (the rest keyword-only), and no call passes 6 or more by position."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("attribution_core", "pipelines")


def _trees(root: Path) -> list[tuple[Path, ast.AST]]:
    return [(p, ast.parse(p.read_text())) for package in PACKAGES for p in sorted((root / package).rglob("*.py"))]


def positional_signatures(root: Path) -> list[str]:
    """Functions of more than 4 parameters that take more than 4 by position."""
    found = []
    for path, tree in _trees(root):
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            positional = [a.arg for a in fn.args.posonlyargs + fn.args.args if a.arg not in ("self", "cls")]
            if len(positional) > 4 and len(positional) + len(fn.args.kwonlyargs) > 4:
                found.append(f"{path.relative_to(root)}:{fn.lineno} {fn.name}({', '.join(positional)}, ...)")
    return found


def positional_calls(root: Path) -> list[str]:
    """Calls that pass 6 or more arguments by position."""
    found = []
    for path, tree in _trees(root):
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and sum(not isinstance(a, ast.Starred) for a in call.args) >= 6:
                found.append(f"{path.relative_to(root)}:{call.lineno} {ast.unparse(call.func)}(...)")
    return found


def test_long_signatures_are_keyword_only():
    found = positional_signatures(ROOT)
    assert not found, "name the parameters after the 4th (add `*,`):\n" + "\n".join(found)


def test_no_call_passes_six_arguments_by_position():
    found = positional_calls(ROOT)
    assert not found, "pass these arguments by name:\n" + "\n".join(found)


def test_the_checks_see_what_they_forbid(tmp_path):
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "attribution_core").mkdir()
    (tmp_path / "pipelines" / "m.py").write_text(
        "def f(a, b, c, d, e):\n    return a\n\n\n"
        "def g(a, b, c, d, *, e):\n    return a\n\n\n"
        "class C:\n    def h(self, a, b, c, d, e=1):\n        return f(1, 2, 3, 4, 5, 6)\n")
    assert positional_signatures(tmp_path) == ["pipelines/m.py:1 f(a, b, c, d, e, ...)",
                                               "pipelines/m.py:10 h(a, b, c, d, e, ...)"]
    assert positional_calls(tmp_path) == ["pipelines/m.py:11 f(...)"]
