"""Every command's --help explains it: a description, every option with its help, the defaults
a user relies on. Derived from the parser, so a new command or option is covered as it lands."""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command a user can run (leaf sub-parsers), by its words."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {path: parser}
    found = {}
    for name, child in subs[0].choices.items():
        found.update(_commands(child, (*path, name)))
    return found


COMMANDS = _commands(build_parser())


def _help(words: tuple[str, ...]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main([*words, "--help"])
    assert exited.value.code == 0
    return " ".join(out.getvalue().split())  # argparse wraps lines: compare words


def test_the_commands_are_the_ones_the_readme_lists():
    assert {" ".join(w) for w in COMMANDS} == {
        "demo", "groups", "config", "model build-tiny", "data synth", "train-model", "generate", "index", "learn-weights",
        "serve", "evaluate", "reindex", "plan", "bench featurize", "bench model-quality", "bench index", "bench reindex", "bench weights",
        "bench serve", "bench search", "bench scale"}
    readme = (ROOT / "README.md").read_text() + (ROOT / "benchmarks" / "README.md").read_text()
    missing = [" ".join(w) for w in COMMANDS if f"attribution {' '.join(w)}" not in readme]
    assert missing == [], "commands the READMEs never show"


@pytest.mark.parametrize("words", sorted(COMMANDS), ids=" ".join)
def test_help_explains(words):
    parser = COMMANDS[words]
    text = _help(words)
    assert text.startswith(f"usage: attribution {' '.join(words)}")
    assert parser.description and len(parser.description.split()) >= 8, "a description that says what it does"
    assert " ".join(parser.description.split())[:60] in text
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        assert action.help and len(action.help.split()) >= 2, f"{action.option_strings[0]} has no help"
        assert action.option_strings[-1] in text
    if any("--config" in a.option_strings for a in parser._actions):
        assert "(default configs/demo.yaml" in text
    if any("--json" in a.option_strings for a in parser._actions):
        assert "--json print" in text


def test_attribution_help_runs_as_installed():
    """The entry point a user types lists every command with a one-line purpose."""
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    top = {words[0] for words in COMMANDS}
    for name in top:
        assert f"    {name}" in out, name
    assert "Learned-weight gradient data attribution" in out
