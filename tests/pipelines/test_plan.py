"""`attribution plan` against a real index run on this machine (a 16 px model, 1,024 rows, 2
actors): its predicted featurize time and bytes per row are within 30 % of what the index job
then measures."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from attribution_core.config import ProjectConfig
from attribution_core.data.writers import write_synthetic
from attribution_core.models.tiny import build_tiny_pipeline
from pipelines.index.job import IndexRequest, run_index
from tests.pipelines.test_cli import attribution, error_line

ROOT = Path(__file__).resolve().parents[2]
ROWS = 1024


def test_plan_predicts_a_real_index_run_within_30_percent(tmp_path, ray_cluster):
    model = build_tiny_pipeline("text", tmp_path / "model", resolution=16, widths=(16, 32))
    settings = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    settings["model"] = {"path": str(model), "device": "cpu"}
    settings["index"].update(out=str(tmp_path / "index"), actors=2, threads_per_actor=1, kernel="block_diagonal",
                             damping_rule="fixed")
    config = tmp_path / "plan.yaml"
    config.write_text(yaml.safe_dump(settings))

    planned = json.loads(attribution("plan", "--config", str(config), "--rows", str(ROWS), "--devices", "2",
                                     "--json").stdout)
    assert planned["rows"] == ROWS and planned["devices"] == 2 and planned["calibration"]["k_total"] > 0
    query = planned["query_ms"]
    assert planned["search"]["partitions"] == 1
    assert abs(query["total"] - (query["featurize"] + query["search"] + query["endpoint_overhead"])) < 0.2

    data = str(tmp_path / "data")
    write_synthetic(data, ROWS, seed=3, size=16)
    built = run_index(ProjectConfig.load(config), IndexRequest(dataset=data, model=str(model), out=str(tmp_path / "index")))
    assert built["rows"] == ROWS and built["actors"] == 2
    real_seconds = built["stage_seconds"]["featurize"]
    predicted_seconds = planned["index"]["featurize_seconds"]
    assert abs(predicted_seconds - real_seconds) <= 0.3 * real_seconds, (predicted_seconds, real_seconds)
    real_bytes = built["bytes_per_example"]
    predicted_bytes = planned["storage"]["bytes_per_row"]
    assert abs(predicted_bytes - real_bytes) <= 0.3 * real_bytes, (predicted_bytes, real_bytes)


def test_plan_refuses_bad_input_in_one_line(tmp_path):
    proc = attribution("plan", "--rows", "0", check=False)
    assert proc.returncode == 2 and "argument --rows: must be >= 1, got 0" in proc.stderr
    proc = attribution("plan", "--config", str(tmp_path / "none.yaml"), "--rows", "10", check=False)
    assert proc.returncode == 2 and "pass --config with a file from configs/" in error_line(proc)
