"""The configuration reference: every key of ``ProjectConfig`` with its type, default and
doc line, read from the dataclasses themselves (the doc line is the string under each
field), so it cannot drift from the code. ``attribution config --reference`` prints it and
``docs/CONFIG.md`` is it, written by ``attribution config --reference --out docs/CONFIG.md``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import re
import textwrap
import types
import typing
from typing import Any

from attribution_core.config import ProjectConfig
from attribution_core.config_io import to_mapping


@dataclasses.dataclass(frozen=True)
class Key:
    """One configuration key: its dotted path, type as written in the code, default (plain
    YAML/JSON form) and doc line; ``section`` when the key is itself a section."""

    path: str
    type: str
    default: Any
    doc: str
    section: bool = False


@functools.cache
def field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """``{field: (annotation as written, doc line)}`` of a config dataclass, from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    out = {}
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            after = body[i + 1] if i + 1 < len(body) else None
            doc = after.value.value if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                                        and isinstance(after.value.value, str)) else ""
            out[node.target.id] = (ast.unparse(node.annotation), " ".join(doc.split()))
    return out


def _section_class(hint: Any) -> type | None:
    """The config dataclass a field holds (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def keys(cls: type = ProjectConfig, prefix: str = "") -> list[Key]:
    """Every key under ``cls`` in field order, a section's own keys before its sub-sections."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out: list[Key] = []
    nested: list[Key] = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        path = f"{prefix}{field.name}"
        annotation, doc = docs.get(field.name, (str(hints[field.name]), ""))
        default = _default(field)
        section = _section_class(hints[field.name])
        if section is not None:
            nested.append(Key(path, annotation, None if default is None else "section", doc, section=True))
            nested += keys(section, f"{path}.")
        else:
            out.append(Key(path, annotation, to_mapping(default), doc))
    return out + nested


def key_map() -> dict[str, Key]:
    """Every key by its dotted path."""
    return {k.path: k for k in keys()}


def render_default(value: Any) -> str:
    """A default as it is written in a YAML config (flow style)."""
    if value is dataclasses.MISSING:
        return "(required)"
    return json.dumps(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """``docs/CONFIG.md``: one table per section."""
    lines = ["# Configuration reference", "",
             "Every key of a config file (`configs/*.yaml`, `deploy/cluster.yaml`), with its type, default and",
             "what it changes. Generated from the code by `attribution config --reference --out docs/CONFIG.md`;",
             "a test fails when this file no longer matches it. A key left out of a config takes its default;",
             "a section whose default is `null` is off until the config gives it.", ""]
    rows: list[Key] = []

    def flush() -> None:
        if rows:
            lines.extend(["| Key | Type | Default | What it changes |", "| --- | --- | --- | --- |"])
            lines.extend(f"| `{k.path}` | `{_cell(k.type)}` | `{_cell(render_default(k.default))}` | {_cell(k.doc)} |"
                         for k in rows)
            lines.append("")
            rows.clear()

    for key in keys():
        if key.section:
            flush()
            depth = key.path.count(".") + 2
            unset = " (default: unset)" if key.default is None else ""
            lines.extend([f"{'#' * min(depth, 4)} `{key.path}`{unset}", "", key.doc, ""])
        else:
            rows.append(key)
    flush()
    return "\n".join(lines).rstrip() + "\n"


_DOTTED = re.compile(r"^[a-z_]+(?:\.[a-z_0-9]+)+$")


def is_config_key(text: str) -> bool:
    """Whether a dotted name starts with a config section (and so must be a key)."""
    return bool(_DOTTED.match(text)) and text.split(".", 1)[0] in {f.name for f in dataclasses.fields(ProjectConfig)}
