"""Kill the index driver mid-job, rerun the same command: exactly once, committed shards kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from attribution_core.data.writers import write_synthetic
from attribution_core.index.store import IndexStore
from tests.pipelines.conftest import FEATURIZE, read_index

ROOT = Path(__file__).resolve().parents[2]
N = 48


def index_command(config: Path, data: str, model: str, out: str, address: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "--log-level", "WARNING", "index", "--config", str(config),
            "--dataset", data, "--model", model, "--out", out, "--ray-address", address, "--json"]


def staged(out: str) -> dict[str, int]:
    """Committed feature shards of the version being built -> their modification time."""
    folders = list(Path(out, "versions").glob("*/features"))
    return {p.name: p.stat().st_mtime_ns for f in folders for p in f.glob("part-*.parquet")}


def test_killed_driver_resumes_exactly_once(tmp_path, ray_cluster, model_dirs):
    data = str(tmp_path / "data")
    write_synthetic(data, N, seed=11, size=16)
    config = tmp_path / "index.yaml"
    # One example per shard and many timesteps, so the job is still running when it is killed.
    config.write_text(yaml.safe_dump({"featurize": {**FEATURIZE, "timesteps": {"count": 24, "strategy": "uniform"}},
                                      "index": {"batch_size": 1, "actors": 2, "threads_per_actor": 1,
                                                "kernel": "auto", "damping_rule": "fixed"}}))
    out = str(tmp_path / "index")
    cmd = index_command(config, data, model_dirs["text"], out, ray_cluster)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    deadline = time.monotonic() + 240
    while len(staged(out)) < 4 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert driver.poll() is None, "the job ended before it could be killed: " + driver.stderr.read().decode()[-2000:]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    time.sleep(3)  # Ray stops the dead driver's actors; nothing may be committed after this
    before = staged(out)
    assert 4 <= len(before) < N
    assert IndexStore(out).latest() is None  # nothing committed: readers see no half-written version

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout)
    manifest, table = read_index(out)
    ids = table.column("example_id").to_pylist()
    assert len(ids) == len(set(ids)) == N == result["rows"]
    assert manifest.build.resumed >= len(before)
    assert result["featurized"] == N - manifest.build.resumed  # committed shards were not redone
    after = staged(out)
    assert all(after.get(name) == mtime for name, mtime in before.items())
    for name in before:  # each pre-kill shard is one example and still whole
        assert pq.read_metadata(next(Path(out).glob(f"versions/*/features/{name}"))).num_rows == 1


def test_killed_actor_is_replaced_and_the_job_ends_exactly_once(tmp_path, ray_cluster, model_dirs):
    import threading

    import psutil

    from pipelines.index.job import IndexRequest, run_index
    from tests.pipelines.conftest import project

    data = str(tmp_path / "data")
    write_synthetic(data, 48, seed=12, size=16)
    out = str(tmp_path / "index")
    killed: list[int] = []

    def kill_one_actor() -> None:
        deadline = time.monotonic() + 240
        while not killed and time.monotonic() < deadline:
            if len(staged(out)) >= 2:
                for proc in psutil.process_iter(["cmdline"]):
                    if "IndexActor" in " ".join(proc.info["cmdline"] or []):
                        proc.kill()
                        killed.append(proc.pid)
                        return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor, daemon=True)
    killer.start()
    cfg = project({"batch_size": 1}, {"timesteps": {"count": 24, "strategy": "uniform"}})
    result = run_index(cfg, IndexRequest(dataset=data, model=model_dirs["text"], out=out))
    killer.join(timeout=1)
    assert killed, "no index actor process was found to kill"
    manifest, table = read_index(out)
    ids = table.column("example_id").to_pylist()
    assert len(ids) == len(set(ids)) == 48 == result["rows"] and manifest.errors.rows == 0
