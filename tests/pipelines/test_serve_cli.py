"""`attribution serve`: blocks while serving, answers, and shuts down cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from attribution_core.data.writers import SYNTH_SCHEMA, synthetic_rows, write_parquet_dataset
from pipelines.index.job import IndexRequest, run_index
from tests.pipelines.conftest import project
from tests.pipelines.http_client import free_port, write_config


def test_serve_command_answers_then_stops_on_ctrl_c(tmp_path, ray_cluster, model_dirs):
    data, index = str(tmp_path / "data"), str(tmp_path / "index")
    write_parquet_dataset(data, list(synthetic_rows(12, seed=2, size=16)), SYNTH_SCHEMA, {"kind": "test"})
    run_index(project(), IndexRequest(dataset=data, model=model_dirs["text"], out=index))
    port = free_port()
    config = write_config(tmp_path / "serve.yaml", model_dirs["text"], index, port, partitions=1)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--config", config],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines[-30:])
            lines.append(line)
            if "Ctrl-C stops" in line:
                break
        assert any(f"at http://127.0.0.1:{port}" in line for line in lines), "".join(lines[-30:])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/index", timeout=30) as r:
            assert json.loads(r.read())["rows"] == 12
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        assert "shutting down" in out
    finally:
        if proc.poll() is None:
            proc.kill()
