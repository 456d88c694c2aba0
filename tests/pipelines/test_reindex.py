"""`attribution reindex`: overlapping runs, idempotence, and the scheduled path end to end —
images added to the dataset, reindex submitted as a Ray Job to a separately started head on
127.0.0.1, a running endpoint swapping to the new version with no failed request."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from attribution_core.config import ProjectConfig
from attribution_core.data.writers import SYNTH_SCHEMA, synthetic_rows, write_parquet_dataset
from attribution_core.index.store import IndexStore
from attribution_core.config_stages import ReindexConfig
from pipelines.reindex.job import ReindexRequest, reindex, relearn_decision
from pipelines.serve.app import ServeArgs
from tests.pipelines.conftest import FEATURIZE
from tests.pipelines.http_client import b64, free_port, free_ports, get, post

N, ADDED = 40, 6
VENV_BIN = str(Path(sys.executable).parent)


def write_dataset(uri: str, added: int = 0) -> list[dict]:
    rows = list(synthetic_rows(N, seed=11, size=16))
    extra = [dict(r, example_id=f"added-{i}") for i, r in enumerate(synthetic_rows(added, seed=99, size=16))]
    if os.path.isdir(uri):
        shutil.rmtree(uri)
    write_parquet_dataset(uri, rows + extra, SYNTH_SCHEMA, {"kind": "test"}, rows_per_file=16)
    return rows + extra


def first_json(text: str) -> dict:
    """The JSON summary in a Ray Job's log (which holds the entrypoint's stderr as well)."""
    start = text.index('{\n  "status"')
    return json.JSONDecoder().raw_decode(text[start:])[0]


@pytest.fixture(scope="module")
def project_dir(tmp_path_factory, ray_cluster, model_dirs):
    root = tmp_path_factory.mktemp("reindex")
    data, index = str(root / "data"), str(root / "index")
    rows = write_dataset(data)
    settings = {
        "model": {"path": model_dirs["text"], "device": "cpu"}, "data": {"uri": data}, "featurize": FEATURIZE,
        "index": {"out": index, "batch_size": 8, "actors": 2, "threads_per_actor": 1, "kernel": "block_diagonal",
                  "damping_rule": "fixed"},
        "weights": {"aspects": ["general"], "queries_per_aspect": 4, "steps": 10, "sample_steps": 3,
                    "max_rounds": 1, "workers": 1, "pool_size": 12},
        "serve": {"host": "127.0.0.1", "port": free_port(), "partitions": 2, "cpus_per_replica": 0.25,
                  "threads": 1, "refresh_s": 0.5},
        "reindex": {"relearn": "changed", "relearn_fraction": 0.5, "lease_ttl_s": 60},
    }
    job_dir = root / "job"  # what a Ray Job ships as its working_dir: the config alone
    job_dir.mkdir()
    (job_dir / "reindex.yaml").write_text(yaml.safe_dump(settings))
    return {"root": root, "data": data, "index": index, "rows": rows, "config": str(job_dir / "reindex.yaml"),
            "job_dir": str(job_dir), "settings": settings}


@pytest.fixture(scope="module")
def first_run(project_dir):
    """The first reindex, with a second run started beside it as a separate process."""
    cfg = ProjectConfig.load(project_dir["config"])
    other = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "--log-level", "WARNING", "reindex",
                              "--config", project_dir["config"], "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        summary = reindex(cfg, ReindexRequest(owner="scheduled-run-a"))
    finally:
        out, err = other.communicate(timeout=300)
    return {"summary": summary, "other": (other.returncode, out, err)}


def test_overlapping_runs_exactly_one_does_the_work(project_dir, first_run):
    summary = first_run["summary"]
    rc, out, err = first_run["other"]
    assert rc == 0, err[-2000:]
    skipped = json.loads(out)  # stdout is the JSON summary alone
    # The second run found the first one's lease, named it, and did nothing.
    assert skipped["status"] == "skipped" and skipped["holder"]["owner"] == "scheduled-run-a"
    assert "scheduled-run-a" in skipped["reason"]
    assert summary["status"] == "published" and summary["version_before"] is None
    assert summary["rows"] == N and summary["rows_added"] == N and summary["changed_fraction"] == 1.0
    assert summary["weights"]["learned"] and summary["weights"]["learned_on"] == summary["version_after"]
    assert set(summary["stage_seconds"]) >= {"lease", "index", "weights", "publish"}
    assert {"scan", "featurize", "stats", "commit"} <= set(summary["index_stage_seconds"])
    store = IndexStore(project_dir["index"])
    assert store.list_versions() == [summary["version_after"]]
    assert store.latest_version() == summary["version_after"]


def test_lease_is_released_and_a_rerun_changes_nothing(project_dir, first_run):
    from pipelines.reindex.lease import Lease

    version = first_run["summary"]["version_after"]
    left = Lease(project_dir["index"]).holder()
    assert left is None or left["expires_at"] <= time.time()  # released at the end, not left to expire
    again = reindex(ProjectConfig.load(project_dir["config"]), ReindexRequest())
    assert again["status"] == "up_to_date" and again["version_before"] == again["version_after"] == version
    assert (again["rows_added"], again["rows_changed"], again["rows_removed"]) == (0, 0, 0)
    assert not again["weights"]["learned"] and again["weights"]["learned_on"] == version
    assert IndexStore(project_dir["index"]).list_versions() == [version]


def processes_naming(text: str) -> list[int]:
    """Pids whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # exited meanwhile
            continue
    return found


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head started like a cluster's (`ray start --head`), on 127.0.0.1, stopped afterwards."""
    temp = tempfile.mkdtemp(prefix="rayh")  # short: Ray's socket paths must fit 107 bytes
    # Every fixed default port may be held by the test session's own Ray: choose them all,
    # distinct (Ray refuses two components on one port).
    names = ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    dashboard, *chosen = free_ports(1 + len(names))
    ports = [f"--{name}={port}" for name, port in zip(names, chosen)]
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    head = subprocess.Popen(
        [f"{VENV_BIN}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", *ports,
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline, last = time.monotonic() + 120, None
        while True:  # up when it runs a job (its dashboard answers before its job agent does)
            assert head.poll() is None, f"ray start --head exited: {head.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, f"the Ray head's job server did not come up in 120 s ({last})"
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
                from ray.job_submission import JobSubmissionClient

                client = JobSubmissionClient(url)
                probe = client.submit_job(entrypoint="true")
                while not client.get_job_status(probe).is_terminal():
                    time.sleep(0.2)
                break
            except (OSError, RuntimeError) as exc:
                last = exc
                time.sleep(0.5)
        yield url
    finally:
        head.send_signal(signal.SIGTERM)  # --block: stops the head's processes with it
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # workers still winding down: end the head's whole session
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        leftover = processes_naming(temp)
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
        assert not leftover, f"the Ray head left processes behind: {leftover}"


def test_reindex_as_a_ray_job_hot_swaps_a_running_endpoint(project_dir, first_run, ray_head):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from pipelines.serve.runner import start, stop

    v1 = first_run["summary"]["version_after"]
    url, info = start(ServeArgs(config=project_dir["config"]), timeout_s=240)  # follows `latest`
    try:
        assert info["version"] == v1
        rows = write_dataset(project_dir["data"], added=ADDED)  # new images arrive in the dataset
        new = rows[N]
        query = {"image": b64(new["image"]), "prompt": new["caption"], "aspects": ["uniform", "general"], "k": 3}
        results: list[tuple[int, dict]] = []
        stop_load = threading.Event()

        def load():  # one client asking about a new image the whole time
            while not stop_load.is_set():
                results.append(post(url, query))
                time.sleep(0.05)

        client = JobSubmissionClient(ray_head)
        loader = threading.Thread(target=load)
        loader.start()
        try:
            job = client.submit_job(
                entrypoint=f"attribution --log-level WARNING reindex --config reindex.yaml --endpoint {url} --json",
                runtime_env={"working_dir": project_dir["job_dir"],
                             "env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1"}})
            deadline = time.monotonic() + 400
            while not client.get_job_status(job).is_terminal():
                assert time.monotonic() < deadline, "the reindex job did not finish in 400 s"
                time.sleep(1)
            logs = client.get_job_logs(job)
            assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
            summary = first_json(logs)
            deadline = time.monotonic() + 120
            while not results or results[-1][1].get("index", {}).get("version") != summary["version_after"]:
                assert time.monotonic() < deadline, "the endpoint did not swap to the published version"
                time.sleep(0.5)
            time.sleep(1.0)
        finally:
            stop_load.set()
            loader.join()
        # The job indexed only the added images and kept the weights (15 % < relearn_fraction 50 %).
        assert summary["status"] == "published" and summary["version_before"] == v1
        assert summary["rows_added"] == ADDED and summary["rows_changed"] == summary["rows_removed"] == 0
        assert summary["featurized"] == ADDED and summary["rows"] == N + ADDED
        assert not summary["weights"]["learned"] and summary["weights"]["learned_on"] == v1
        # The job waited until the endpoint answered from what it published.
        assert summary["endpoint"]["url"] == url and summary["endpoint"]["serving"] == summary["version_after"]
        assert 0 <= summary["endpoint"]["swapped_after_s"] <= summary["stage_seconds"]["endpoint"] + 0.01
        # Not one failed request while the replicas swapped; the answers moved from v1 to v2.
        assert [s for s, _ in results if s != 200] == [], [a for s, a in results if s != 200][:3]
        versions = [a["index"]["version"] for _, a in results]
        assert versions[0] == v1 and versions[-1] == summary["version_after"]
        assert set(versions) == {v1, summary["version_after"]}
        # The new version answers with the added image first; the old one could not.
        assert results[-1][1]["aspects"]["uniform"][0]["example_id"] == new["example_id"]
        assert all(a["aspects"]["uniform"][0]["example_id"] != new["example_id"]
                   for _, a in results if a["index"]["version"] == v1)
        status, served = get(url, "/v1/index")
        assert served["rows"] == N + ADDED and served["weights"]["learned_on"] == v1
        assert "general" in served["aspects"]
    finally:
        stop()


def test_a_run_stopped_before_publishing_is_finished_by_the_next(project_dir, first_run):
    """The crash window between committing a version and moving `latest`: nothing serves the
    committed version, and the next run publishes it without featurizing anything again."""
    from pipelines.index.job import IndexRequest, run_index

    cfg = ProjectConfig.load(project_dir["config"])
    store = IndexStore(project_dir["index"])
    before = store.latest_version()
    write_dataset(project_dir["data"], added=ADDED + 2)
    built = run_index(cfg, IndexRequest(dataset=cfg.data.uri, model=cfg.model.path, out=cfg.index.out,
                                        publish=False))
    assert built["featurized"] > 0 and store.is_committed(built["version"])
    assert store.latest_version() == before  # committed, not published
    summary = reindex(cfg, ReindexRequest())
    assert summary["status"] == "published" and summary["version_after"] == built["version"]
    assert summary["version_before"] == before and summary["featurized"] == 0
    assert summary["rows_added"] + summary["rows_changed"] == built["featurized"]
    assert summary["rows"] == N + ADDED + 2
    assert store.latest_version() == built["version"]


def test_reindex_learns_weights_again_only_when_asked_or_needed():
    changed = ReindexConfig(relearn="changed", relearn_fraction=0.1)
    assert relearn_decision(changed, "v2", None, 0.0)[0]  # nothing fits: a first build or new features
    assert relearn_decision(changed, "v2", "v1", 0.25) == (
        True, "25.0% of the rows changed since v1, more than reindex.relearn_fraction (10.0%)")
    learn, why = relearn_decision(changed, "v2", "v1", 0.1)
    assert not learn and "the weights learned on v1 still serve" in why
    assert relearn_decision(changed, "v2", "v2", 0.9) == (False, "already learned for this version")
    always = ReindexConfig(relearn="always")
    assert all(relearn_decision(always, "v2", seen, 0.0)[0] for seen in (None, "v1", "v2"))
