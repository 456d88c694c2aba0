"""Every command refuses bad input with exit status 2 and one line saying what to change,
before it starts any Ray, Serve or training work."""

from __future__ import annotations

import contextlib
import io

import pytest

from pipelines.cli import main
from tests.pipelines.test_cli_help import COMMANDS

MISSING = "/nonexistent/config.yaml"
CONFIG_FIX = "pass --config with a file from configs/"

# command words -> (bad arguments, what the one line must say)
CASES = {
    ("demo",): (["--config", MISSING], CONFIG_FIX),
    ("groups",): (["--config", MISSING], CONFIG_FIX),
    ("config",): (["--config", MISSING], CONFIG_FIX),
    ("model", "build-tiny"): (["--kind", "text", "--out", "{tmp}/m", "--widths", "8,oops"],
                              "argument --widths: expected a whole number, got 'oops'"),
    ("data", "synth"): (["--out", "{tmp}/d", "--n", "4", "--holdout", "subject=nothing"],
                        "holdout subject 'nothing' is not one of"),
    ("train-model",): (["--config", MISSING], CONFIG_FIX),
    ("generate",): (["--model", "{tmp}/no-model", "--prompt", "a ring", "--out", "{tmp}/g"],
                    "point --model at a diffusers pipeline directory"),
    ("index",): (["--config", MISSING], CONFIG_FIX),
    ("learn-weights",): (["--config", MISSING], CONFIG_FIX),
    ("serve",): (["--config", MISSING], CONFIG_FIX),
    ("evaluate",): (["--config", MISSING], CONFIG_FIX),
    ("reindex",): (["--config", MISSING], CONFIG_FIX),
    ("plan",): (["--config", MISSING, "--rows", "10"], CONFIG_FIX),
    ("bench", "featurize"): (["--examples", "0"], "argument --examples: must be >= 1, got 0"),
    ("bench", "model-quality"): (["--model", "{tmp}/no-model"], "pass --data URI"),
    ("bench", "index"): (["--config", MISSING], CONFIG_FIX),
    ("bench", "reindex"): (["--add", "0"], "argument --add: must be > 0, got 0"),
    ("bench", "weights"): (["--config", MISSING], CONFIG_FIX),
    ("bench", "serve"): (["--concurrency", "1", "8", "--requests", "10"], "give one request count per level"),
    ("bench", "scale"): (["--timesteps", "-1"], "argument --timesteps: must be >= 1, got -1"),
    ("bench", "search"): (["--index", "{tmp}/no-index"], "no committed index at"),
}


def test_every_command_has_a_bad_input_case():
    assert set(CASES) == set(COMMANDS)


@pytest.mark.parametrize("words", sorted(CASES), ids=" ".join)
def test_bad_input_exits_2_with_one_line(words, tmp_path, monkeypatch):
    import ray

    def no_ray(*_, **__):
        raise AssertionError("refused input must not start or join Ray")

    # Ray may be up already (other tests in this process): pretend not, and fail on any start.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)
    args, says = CASES[words]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main([*words, *(a.format(tmp=tmp_path) for a in args)])
        except SystemExit as exc:  # refused by the parser itself (a wrong type or range)
            code = exc.code
    lines = [line for line in err.getvalue().splitlines() if "error: " in line]
    assert code == 2 and len(lines) == 1, err.getvalue()
    assert says in lines[0]
