"""The configuration reference (docs/CONFIG.md, `attribution config --reference`) is the code's,
and what the docs, the shipped configs, the deploy files and every --help say about config
keys and their defaults agrees with the code."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from attribution_core.config_reference import is_config_key, key_map, keys, reference_markdown, render_default

ROOT = Path(__file__).resolve().parents[2]
FILE_SUFFIX = re.compile(r"\.(safetensors|json|ya?ml|py|md|html|parquet|png|txt)$")
DOCS = [ROOT / "README.md", ROOT / "deploy" / "README.md", ROOT / "benchmarks" / "README.md",
        *sorted((ROOT / "configs").glob("*.yaml")), *sorted((ROOT / "deploy").glob("**/*.yaml"))]


def test_docs_config_md_is_the_generated_reference():
    written = (ROOT / "docs" / "CONFIG.md").read_text()
    assert written == reference_markdown(), (
        "docs/CONFIG.md no longer matches the config dataclasses: run "
        "`attribution config --reference --out docs/CONFIG.md`")
    assert "docs/CONFIG.md" in (ROOT / "README.md").read_text(), "the README links the reference"


def test_every_key_has_a_type_a_default_and_a_doc_line():
    found = keys()
    assert len(found) > 200
    assert [k.path for k in found if not k.doc] == []
    paths = {k.path for k in found}
    for expected in ("model.base", "data.image_column", "data.id_column", "index.keep_columns",
                     "index.quarantine_check_rows", "featurize.groups.lora_only", "evaluate.exemplars.columns"):
        assert expected in paths
    assert key_map()["index.kernel"].default == "objective" and render_default(key_map()["index.keep_columns"].default) == "[]"


def _literal(text: str):
    """A default as docs write it: 1,024 -> 1024; true -> True; words stay words."""
    text = text.strip().strip("`")
    plain = text.replace(",", "").replace("_", "")
    for cast in (int, float):
        try:
            return cast(plain)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text, text)


def _mentions(text: str) -> list[str]:
    names = re.findall(r"(?<![\w./-])([a-z_]+(?:\.[a-z_0-9]+)+)(?![\w/(-])", text)
    return [n for n in names if is_config_key(n) and not FILE_SUFFIX.search(n)]


def test_every_key_the_docs_and_shipped_files_name_exists():
    known = key_map()
    unknown = sorted({f"{doc.relative_to(ROOT)}: {name}" for doc in DOCS for name in _mentions(doc.read_text())
                      if name not in known})
    assert unknown == [], "keys named in the docs or config files that the code does not have"


def test_defaults_the_readmes_claim_are_the_code_defaults():
    """`key` (VALUE), `key` things (VALUE) and `key: VALUE`, the default."""
    known = key_map()
    claims = []
    for doc in DOCS[:3]:
        text = doc.read_text()
        claims += re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+)` (?:[a-z]+ ){0,3}\(([0-9][0-9,._]*|true|false)\)", text)
        claims += re.findall(r"`([a-z_]+(?:\.[a-z_0-9]+)+): ([^`]+)`,? the default", text)
    claims = [(k, v) for k, v in claims if k in known]
    assert len(claims) >= 6, claims  # the check looks at something
    wrong = [f"{k}: docs say {v}, the code {render_default(known[k].default)}" for k, v in claims
             if _literal(v) != known[k].default]
    assert wrong == []


def _help_texts(parser: argparse.ArgumentParser, where: str = "attribution"):
    yield where, parser.description or ""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _help_texts(sub, f"{where} {name}")
        elif action.help:
            yield f"{where} {'/'.join(action.option_strings) or action.dest}", action.help


def test_every_help_names_real_keys_and_their_real_defaults():
    from pipelines.cli import build_parser

    known = key_map()
    texts = list(_help_texts(build_parser()))
    assert len(texts) > 100
    unknown = sorted({f"{where}: {name}" for where, text in texts for name in _mentions(text) if name not in known})
    assert unknown == []
    claims = [(where, k, v) for where, text in texts
              for k, v in re.findall(r"default: ([a-z_]+(?:\.[a-z_0-9]+)+), ([0-9.]+|[a-z_]+)\)", text)]
    assert claims, "some --help names a key's default value"
    wrong = [f"{where}: {k} {v} vs {render_default(known[k].default)}" for where, k, v in claims
             if _literal(v) != known[k].default]
    assert wrong == []
