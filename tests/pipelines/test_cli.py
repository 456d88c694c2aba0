"""The `attribution` command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def attribution(*args: str, cwd: Path = ROOT, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(ROOT)})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line a failed command prints. Ray forwards its workers' log lines to
    the driver's stderr asynchronously, so one may land after it: look for it, not at the end."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _demo_config(tmp_path: Path, model_dir: str | None = None) -> Path:
    from tests.pipelines.conftest import tiny_main_job

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_main_job(tmp_path, kernel_rule="objective", serve={"port": port})
    if model_dir:
        cfg["model"]["path"] = model_dir
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_demo_end_to_end(tmp_path, ray_cluster):
    """synth -> train -> index -> learn weights -> evaluate -> endpoint answers one query;
    a rerun skips every cached step and measures the same numbers."""
    from attribution_core.index.store import IndexStore
    from pipelines.demo import summary_text as demo_text

    config = _demo_config(tmp_path)
    on_cluster = {"RAY_ADDRESS": ray_cluster}  # the session's Ray instead of a second local one
    out = attribution("demo", "--config", str(config), "--json", env=on_cluster).stdout
    # stdout holds the JSON alone: the cluster log lines a joined driver forwards go to stderr.
    result = json.loads(out)
    metrics, served = result["evaluation"], result["served"]
    info = metrics["info"]
    assert set(info["prepared"]) == {"data", "model"}  # the first run makes both
    built = info["index_build"]
    assert built["rows"] == 48 and built["errors"] == 0 and built["featurized"] == 48 and not built["up_to_date"]
    assert IndexStore(str(tmp_path / "index")).latest().version == built["version"]
    assert info["weights_learned_now"] and info["aspects_learned"] == ["background", "general", "style", "subject"]
    # The evaluation: every basis with uniform and learned weights, CIs around their means.
    assert set(metrics["lds"]) == {"tracin", "trak", "dtrak"}
    for basis, row in metrics["lds"].items():
        for name in ("uniform", "learned"):
            lo, hi = row[f"{name}_ci"]
            assert -1 <= lo <= row[name] <= hi <= 1
        if basis in ("trak", "dtrak"):  # the sweep rebuilds the kernel; at the index's own damping it is the same
            sweep = {d["damping"]: d for d in row["damping"]}
            own = row["kernel_choice"]["damping"]  # chosen by the objective from the same two dampings
            assert set(sweep) == {0.01, 1.0} and sweep[own]["uniform"] == pytest.approx(row["uniform"], abs=1e-3)
            assert sweep[own]["learned"] == pytest.approx(row["learned"], abs=1e-3)
        room = row["headroom"]  # weights fitted to LDS on halves: evaluation only, beside uniform / learned
        assert all(-1 <= room[k] <= 1 for k in ("uniform", "learned", "lds")) and set(room["weights"]) == set(row["weights"])
    assert metrics["n_subsets"] == 4 and metrics["n_queries"] == 5
    columns = {"aspect", "validated", "general", "uniform", "contrastive", "contrastive_aspect", "pixel_knn"}
    for key in ("recall_at_10", "recall_heldout_at_10"):  # captions seen in training, and held-out combinations
        assert set(metrics[key]) == {"subject", "style", "background"}
        for row in metrics[key].values():
            assert set(row) == columns and all(0 <= v <= 1 for v in row.values())
    assert info["recall_heldout_queries"] == 6
    for kind, key in (("seen", "recall_at_10"), ("heldout", "recall_heldout_at_10")):  # intervals over queries
        for aspect, row in metrics[key].items():
            ci = metrics["recall_intervals"][kind][aspect]
            assert all(ci[c][0] - 1e-4 <= row[c] <= ci[c][1] + 1e-4 for c in row)
            assert ci["aspect-uniform"][0] == pytest.approx(row["aspect"] - row["uniform"], abs=2e-4)
    # Each aspect's learning queries were read back by an attribute classifier of the real images.
    learned = IndexStore(str(tmp_path / "index")).read_json(f"versions/{built['version']}/weights/learned.json")
    for aspect in ("subject", "style", "background"):
        assert 0.0 <= learned["aspects"][aspect]["shown"] <= 1.0
    assert learned["aspects"]["general"]["shown"] is None
    for aspect, row in metrics["recall_at_10"].items():  # what the endpoint answers the aspect with
        assert row["validated"] == row[{aspect: "aspect"}.get(learned["aspects"][aspect]["answered_by"],
                                           learned["aspects"][aspect]["answered_by"])]
    assert info["ground_truth"]["trained"] == 4
    check = metrics["exemplar_check"]  # one subject and one style set, fine-tuned and attributed
    assert sorted(s["kind"] for s in check["sets"]) == ["style", "subject"] and check["distractors"] == 48 - 6
    assert set(check["table"]) == {"subject", "style", "all"}
    assert {"served", "general", "subject", "style", "background", "uniform", "contrastive", "pixel_knn",
            "control"} == set(check["table"]["all"])
    for kind in ("subject", "style"):  # the served column is the weighting the endpoint answers the kind with
        row = check["table"][kind]
        assert row["served"]["recall"] == row[learned["aspects"][kind]["answered_by"]]["recall"]
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["lds"] == metrics["lds"] and on_disk["recall_at_10"] == metrics["recall_at_10"]
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "Linear datamodeling score" in report and report.count("data:image/png;base64,") >= 2 * (1 + 3)
    assert "Held-out attribute combinations" in report and "contrastive + aspect weights" in report
    assert "Headroom estimate of group weighting" in report and "LDS by kernel damping" in report
    assert "<div class=label>subject, contrastive</div>" in report  # the gallery ranks by each contrastive query too
    assert "Exemplar check: attribution by customization" in report and "<b>subject-" in report
    # The endpoint answered the generated query for every learned aspect.
    answer = served["answers"][0]["answer"]
    assert set(answer["aspects"]) == {"general", "subject", "style", "background"}
    chosen = {a: w["answered_by"] for a, w in learned["aspects"].items()}  # by their validation, general by LDS
    assert info["answered_by"] == chosen and set(info["validation"]) == {"general", "subject", "style", "background"}
    general = learned["aspects"]["general"]["choice"]  # the served index is D-TRAK's: LDS of dtrak decided
    assert general["by"] == "lds" and general["basis"] == "dtrak"
    assert chosen["general"] == ("general" if metrics["lds"]["dtrak"]["served"]["weighting"] == "learned" else "uniform")
    assert answer["substituted"] == {a: used for a, used in chosen.items() if used != a}
    assert answer["answered_by"] == chosen  # every answer names the weighting of each aspect
    assert all(len(top) == 2 for top in answer["aspects"].values()) and answer["index"]["version"] == built["version"]

    # A second run trains, indexes, learns and retrains nothing, and measures the same numbers:
    # `demo` is `evaluate` and then the endpoint, which answered above, so the rerun is `evaluate`.
    again = json.loads(attribution("evaluate", "--config", str(config), "--json", env=on_cluster).stdout)
    assert again["info"]["prepared"] == {} and again["info"]["index_build"]["up_to_date"]
    assert not again["info"]["weights_learned_now"] and again["info"]["ground_truth"]["trained"] == 0
    assert info["universe_model_trained_now"] and not again["info"]["universe_model_trained_now"]
    assert again["lds"] == metrics["lds"] and again["recall_at_10"] == metrics["recall_at_10"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["lds"] == again["lds"]
    # What `demo` prints without --json, for that rerun and the endpoint's answer.
    text = demo_text({"evaluation": again, "served": served})
    assert "up to date" in text and "LDS (4 subsets, 5 queries" in text and "query:" in text
    assert "Exemplar check (attribution by customization): 2 set(s) of 3/3 exemplars" in text
    assert again["exemplar_check"]["table"] == check["table"]  # deterministic
    assert f"subject answered by {chosen['subject']} (" in text
    for aspect, used in chosen.items():  # the printed answer says which weights answered each aspect
        assert (f"    {aspect}: (answered with the {used} weights)\n" if used != aspect else f"    {aspect}:\n") in text
    assert f"report           {(tmp_path / 'eval' / 'report.html').resolve()}" in text


@pytest.mark.slow  # a subprocess that imports the stack, trains or starts Ray
def test_groups_command(tmp_path, model_dirs):
    config = _demo_config(tmp_path, model_dirs["text"])
    out = attribution("groups", "--config", str(config)).stdout
    layout = json.loads(attribution("groups", "--config", str(config), "--json").stdout)
    assert layout["k_total"] == sum(g["dim"] for g in layout["groups"])
    assert f"{len(layout['layers'])} tracked layers, {len(layout['groups'])} groups" in out
    assert all(g["name"] in out for g in layout["groups"])  # the demo groups by function: io, cross_attn_k, ...
    assert "cross_attn_k" in out


@pytest.mark.slow  # a subprocess that imports the stack, trains or starts Ray
def test_errors_are_one_line_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("featurize: {measurement: gradient}\n")
    proc = attribution("demo", "--config", str(bad), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: featurize.measurement: unknown measurement")
    proc = attribution("groups", "--config", str(_demo_config(tmp_path)), "--model", str(tmp_path / "none"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@pytest.mark.slow  # a subprocess that imports the stack, trains or starts Ray
def test_build_tiny_model_saves_a_pipeline_that_loads_and_featurizes(tmp_path):
    """What a user does next with a built model: diffusers loads it, and the featurizer gives
    finite features of the layout's size for each example."""
    from diffusers import DiffusionPipeline

    from attribution_core.config import FeaturizeConfig, from_mapping
    from attribution_core.features.featurize import Featurizer
    from attribution_core.models.pipeline_dir import load_adapter
    from tests.conftest import make_batch
    from tests.pipelines.conftest import FEATURIZE

    out = tmp_path / "m"
    proc = attribution("model", "build-tiny", "--kind", "text-latent", "--out", str(out), "--widths", "8,16")
    assert str(out) in proc.stdout
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(pipe.components)
    assert list(pipe.unet.config.block_out_channels) == [8, 16]
    adapter = load_adapter(str(out))
    featurizer = Featurizer(adapter, from_mapping(FeaturizeConfig, FEATURIZE))
    features = featurizer.flat(make_batch(adapter, n=2))
    assert features.shape == (2, featurizer.layout.k_total) and bool(features.isfinite().all())
    assert float(features.abs().sum()) > 0


@pytest.mark.slow  # a subprocess that imports the stack, trains or starts Ray
def test_bench_featurize_prints_the_fields(tmp_path):
    proc = attribution("bench", "featurize", "--json", "--examples", "2", "--timesteps", "1", "--repeats", "1")
    result = json.loads(proc.stdout)
    for key in ("n_params", "k_total", "rows", "featurize_rows_per_s", "train_step_rows_per_s",
                "ratio_vs_train_step", "dense_rows_per_s", "speedup_vs_dense", "reference_max_rel_err",
                "peak_rss_mb"):
        assert result[key] is not None, key
    assert result["rows"] == 2
    assert result["reference_max_rel_err"] < 1e-4


def test_index_command_prints_the_summary_and_explains_errors(tmp_path, ray_cluster, model_dirs):
    from attribution_core.data.writers import write_synthetic

    write_synthetic(str(tmp_path / "data"), 10, seed=2, size=16)
    config = tmp_path / "index.yaml"
    config.write_text(yaml.safe_dump({"featurize": {"timesteps": {"count": 2}, "projection": {"k_in": 4, "k_out": 4}},
                                      "index": {"batch_size": 4, "actors": 1, "kernel": "auto",
                                                "damping_rule": "fixed"}}))  # the rule has tests of its own
    common = ("--config", str(config), "--model", model_dirs["text"], "--ray-address", ray_cluster)
    run = attribution("--log-level", "WARNING", "index", *common, "--dataset", str(tmp_path / "data"),
                      "--out", str(tmp_path / "index"), "--json")
    result = json.loads(run.stdout)
    for key in ("version", "rows", "errors", "seconds", "rows_per_s", "bytes_per_example", "uri", "stage_seconds"):
        assert key in result, key
    assert result["rows"] == 10 and result["errors"] == 0 and result["bytes_per_example"] > 0
    again = attribution("--log-level", "WARNING", "index", *common, "--dataset", str(tmp_path / "data"),
                        "--out", str(tmp_path / "index"))
    assert "up to date" in again.stdout
    missing = attribution("index", *common, "--dataset", str(tmp_path / "nowhere"), "--out", str(tmp_path / "i2"),
                          check=False)
    assert missing.returncode == 2 and "does not exist" in error_line(missing)


def test_bench_weights_prints_scan_and_optimise_times(tmp_path, ray_cluster):
    config = tmp_path / "weights.yaml"
    config.write_text(yaml.safe_dump({"weights": {"steps": 10, "report_every": 5, "workers": 1, "pool_size": 16}}))
    run = attribution("--log-level", "WARNING", "bench", "weights", "--config", str(config), "--sizes", "3000,9000",
                      "--queries", "16", "--groups", "4", "--dim", "8", "--json", env={"RAY_ADDRESS": ray_cluster})
    results = json.loads(run.stdout)["results"]
    assert [r["n"] for r in results] == [3000, 9000]
    for r in results:
        assert r["queries"] == 16 and r["scan_s"] > 0 and r["optimise_s"] > 0 and r["pool_candidates"] >= 10
