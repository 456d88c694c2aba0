"""The jobs on a Ray cluster of a head and two worker nodes (``ray start`` on 127.0.0.1, each
node its own raylet, object store and pid namespace; see ``multinode.py``), the data and the
index on the S3-protocol test server, and a worker node killed mid-job."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from attribution_core.data.writers import SYNTH_SCHEMA, synthetic_rows
from attribution_core.index.source import filesystem_for
from attribution_core.index.store import IndexStore
from tests.pipelines.conftest import FEATURIZE, write_rows
from tests.pipelines.http_client import b64, free_port, get, post, write_config
from tests.pipelines.multinode import LocalCluster, isolated, start_cluster

pytestmark = pytest.mark.slow
WORKERS = {"w1": 2, "w2": 2}
ATTRIBUTION = str(Path(sys.executable).with_name("attribution"))


@pytest.fixture(scope="module")
def cluster(s3_base, tmp_path_factory):
    if not isolated():
        pytest.skip("starting and killing Ray nodes needs pid namespaces (unshare -p: root or user namespaces)")
    started = start_cluster(tmp_path_factory.mktemp("cluster"), WORKERS, head_cpus=1)
    try:
        yield started
    finally:
        started.stop()


def config(tmp_path: Path, **sections: dict) -> str:
    cfg = {"featurize": FEATURIZE,
           "index": {"batch_size": 8, "actors": 3, "threads_per_actor": 1, "kernel": "block_diagonal",
                     "damping_rule": "fixed"},
           "cluster": {"stall_timeout_s": 240}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def attribution(cluster: LocalCluster, *args: str, timeout: float = 400,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ATTRIBUTION, *args, "--ray-address", cluster.address], env={**cluster.env, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def add_file(uri: str, name: str, rows: list[dict]) -> None:
    fs, root = filesystem_for(uri)
    pq.write_table(pa.Table.from_pylist(rows, schema=SYNTH_SCHEMA), f"{root}/{name}", filesystem=fs)


def test_local_paths_are_refused_on_a_cluster(cluster, s3_base, model_dirs, tmp_path):
    """A local path is not shared between real nodes: refused in one line, before any work."""
    rows = list(synthetic_rows(8, seed=1, size=16))
    local, shared = write_rows(str(tmp_path / "data"), rows), write_rows(f"{s3_base}/refused-data", rows)
    cfg = config(tmp_path)
    for args, key in ((["--dataset", local, "--out", f"{s3_base}/refused"], "data.uri"),
                      (["--dataset", shared, "--out", str(tmp_path / "index")], "index.out")):
        run = attribution(cluster, "index", "--config", cfg, "--model", model_dirs["text"], *args)
        assert run.returncode == 2, run.stderr[-2000:]
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]  # Ray forwards node logs too
        assert len(errors) == 1, run.stderr[-2000:]
        line = errors[0]
        assert line.startswith("error: the Ray cluster has 3 nodes") and key in line and "s3://" in line, line
        assert "cluster.shared_filesystem" in line


def test_an_index_job_that_cannot_be_placed_stops_and_says_why(cluster, s3_base, model_dirs, tmp_path):
    """Actors that no node can hold (a resource no node offers): the job neither hangs nor
    fails silently; it stops after ``cluster.stall_timeout_s`` with what it asked for."""
    cluster.revive(WORKERS)
    data = write_rows(f"{s3_base}/unplaceable-data", list(synthetic_rows(16, seed=3, size=16)))
    cfg = config(tmp_path, index={"actors": 2, "actor_resources": {"gpu-node": 1}}, cluster={"stall_timeout_s": 4})
    start = time.monotonic()
    run = attribution(cluster, "index", "--config", cfg, "--model", model_dirs["text"], "--dataset", data,
                      "--out", f"{s3_base}/unplaceable-index", timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert "the index job's featurize stage made no progress in" in line and "cluster.stall_timeout_s" in line, line
    assert "2 actors of 0.5 CPU and 1 gpu-node each" in line and "free on 3 node(s)" in line, line
    assert time.monotonic() - start < 120


def _wait_for_shards(uri: str, at_least: int, process: subprocess.Popen, timeout: float = 300) -> int:
    """Wait until an uncommitted version under ``uri`` holds ``at_least`` feature shards."""
    store = IndexStore(uri)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        building = [v for v in store.list_versions() if not store.is_committed(v)]
        count = max((len(store.list_shards(v, "features")) for v in building), default=0)
        if count >= at_least:
            return count
        time.sleep(0.5)
    raise TimeoutError(f"no {at_least} shards after {timeout} s")


def test_index_job_on_two_worker_nodes_survives_losing_one(cluster, s3_base, model_dirs, tmp_path):
    """Actors on both worker nodes; then an incremental build loses one of them mid-job and
    still commits every example exactly once, and a rerun finds the index up to date."""
    cluster.revive(WORKERS)
    data, out = f"{s3_base}/multinode-data", f"{s3_base}/multinode-index"
    first = list(synthetic_rows(64, seed=11, size=16))
    write_rows(data, first)
    cfg = config(tmp_path, index={"actors": 2, "placement": "SPREAD", "actor_resources": {"worker": 0.01}})
    args = ("index", "--config", cfg, "--model", model_dirs["text"], "--dataset", data, "--out", out, "--json")
    # Ray Data hands batches to the actors that are ready: wait for both before any work, or on a
    # slow machine the first actor can take every batch before the second starts
    run = attribution(cluster, *args, env={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120"})
    assert run.returncode == 0, run.stderr[-3000:]
    built = json.loads(run.stdout)
    names = cluster.node_names()
    by_name = {names.get(node, node): rows for node, rows in built["rows_by_node"].items()}
    assert {"w1", "w2"} <= set(by_name), by_name  # actors on both worker nodes
    assert sum(by_name.values()) == 64

    # 128 more rows; worker node w1 dies (raylet, object store, workers) once 4 of their 16 shards are written
    added = [dict(r, example_id=f"more-{i}") for i, r in enumerate(synthetic_rows(128, seed=12, size=16))]
    for i in range(0, len(added), 64):
        add_file(data, f"part-more-{i // 64:02d}.parquet", added[i:i + 64])
    job = subprocess.Popen([ATTRIBUTION, *args, "--ray-address", cluster.address], env=cluster.env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    written = _wait_for_shards(out, 4, job)
    cluster.kill("w1")
    stdout, stderr = job.communicate(timeout=400)
    assert job.returncode == 0, stderr[-4000:]
    result = json.loads(stdout)
    assert written < 16 and result["rows"] == 192 and result["errors"] == 0
    resumed = sum("lost a node of the Ray cluster" in line for line in stderr.splitlines())
    print(f"index: w1 killed after {written} of 16 shards; the job resumed {resumed} time(s), "
          f"featurized {result['featurized']} rows in the run that finished")

    store = IndexStore(out)
    manifest = store.latest()
    ids = [i for s in manifest.shards for i in store.read_table(s.path).column("example_id").to_pylist()]
    assert len(ids) == len(set(ids)) == 192  # every example exactly once
    assert set(ids) == {r["example_id"] for r in first + added}
    assert manifest.rows == 192 and sum(s.rows for s in manifest.shards) == 192

    again = attribution(cluster, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["up_to_date"] is True


@pytest.fixture(scope="module")
def cluster_index(cluster, s3_base, model_dirs, tmp_path_factory):
    """64 examples indexed on the cluster, for the weights and the endpoint: by one actor (the
    index test spreads actors over the nodes; with the cluster's start, 67 s with three, 43 s with one)."""
    cluster.revive(WORKERS)
    data, out = f"{s3_base}/cluster-data", f"{s3_base}/cluster-index"
    write_rows(data, list(synthetic_rows(64, seed=21, size=16)))
    cfg = config(tmp_path_factory.mktemp("cluster-index"), index={"actors": 1, "batch_size": 16})
    run = attribution(cluster, "index", "--config", cfg, "--model", model_dirs["text"], "--dataset", data,
                      "--out", out, "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def _train_checkpoints(index: str) -> int:
    fs, root = filesystem_for(index)
    found = fs.get_file_info(pafs.FileSelector(f"{root}/_train", recursive=True, allow_not_found=True))
    return sum(1 for f in found if f.base_name == "theta.json")


def test_weights_learning_survives_losing_a_train_workers_node(cluster, cluster_index, model_dirs, tmp_path):
    """Two Ray Train workers on two nodes; the node of one dies mid-run: the run resumes from
    its checkpoint (theta and Adam's moments) and learns the weights an undisturbed run learns."""
    cluster.revive(WORKERS)
    weights = {"aspects": ["general"], "queries_per_aspect": 8, "sample_steps": 3, "pool_size": 16, "top_k": 4,
               "max_rounds": 1, "steps": 1200, "report_every": 60, "workers": 2, "placement": "SPREAD",
               "check_queries": False, "holdout_queries": 0, "validation_queries": 0}

    def learn(name: str, kill: bool) -> dict:
        cfg = config(tmp_path / name, weights={**weights, "name": name})
        job = subprocess.Popen([ATTRIBUTION, "learn-weights", "--config", cfg, "--index", cluster_index, "--model",
                                model_dirs["text"], "--json", "--ray-address", cluster.address], env=cluster.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        killed = None
        if kill:
            deadline = time.monotonic() + 300
            while _train_checkpoints(cluster_index) < 2 and time.monotonic() < deadline:
                assert job.poll() is None, job.communicate()[1][-3000:]
                time.sleep(0.2)
            on = [n for n in cluster.actor_nodes("RayTrainWorker") if n != "head"]
            assert on, "no Ray Train worker on a worker node"
            killed = on[0]
            cluster.kill(killed)
        stdout, stderr = job.communicate(timeout=400)
        assert job.returncode == 0, stderr[-4000:]
        return {"summary": json.loads(stdout), "killed": killed, "stderr": stderr}

    (tmp_path / "calm").mkdir()
    (tmp_path / "disturbed").mkdir()
    calm = learn("calm", kill=False)
    disturbed = learn("disturbed", kill=True)
    assert disturbed["killed"] in WORKERS
    restarts = disturbed["stderr"].count("[FailurePolicy] RETRY")
    print(f"learn-weights: killed {disturbed['killed']}; Ray Train worker group restarts: {restarts}")
    a, b = calm["summary"]["aspects"]["general"]["weights"], disturbed["summary"]["aspects"]["general"]["weights"]
    assert a.keys() == b.keys()
    assert max(abs(a[g] - b[g]) for g in a) < 1e-6, (a, b)
    assert disturbed["summary"]["objective"] == pytest.approx(calm["summary"]["objective"], rel=1e-6)
    assert _train_checkpoints(cluster_index) == 0  # the run folders are removed


def _answer(reply: dict) -> list[tuple[str, float]]:
    return [(hit["example_id"], round(hit["score"], 4)) for hit in reply["aspects"]["general"]]


def test_endpoint_under_load_loses_a_worker_node_then_a_reindex_job_swaps_it(cluster, cluster_index, s3_base,
                                                                              model_dirs, tmp_path):
    """The ingress on the head, two partitions' searcher replicas on both worker nodes, 8
    clients asking steadily; a worker node dies. Requests that fail say so (503); every answer
    given, before, during and after, is whole: equal to the same query's answer before the
    loss, every partition's rows in it. Then the nightly update as a cluster runs it:
    ``attribution reindex`` submitted as a Ray Job (``ray job submit``, the entrypoint on the
    head, as the KubeRay RayJob does); the endpoint follows the index and the job waits until
    it answers from the new version."""
    cluster.revive(WORKERS)
    port = free_port()
    cfg = write_config(tmp_path / "serve.yaml", model_dirs["text"], cluster_index, port, partitions=2,
                       searcher_replicas=2, ingress_resources={"head": 0.01}, searcher_resources={"worker": 0.01},
                       proxy_location="HeadOnly", refresh_s=1, batch_wait_ms=0)
    server = subprocess.Popen([ATTRIBUTION, "serve", "--config", cfg, "--ray-address", cluster.address],
                              env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert server.stdout.readline().startswith("serving "), server.communicate(timeout=30)[1][-3000:]
        assert cluster.actor_nodes("AttributionAPI") == ["head"]
        searchers = set(cluster.actor_nodes("IndexSearcher"))
        assert searchers == {"w1", "w2"}, searchers
        images = [r["image"] for r in synthetic_rows(4, seed=99, size=16)]
        expected = []
        for image in images:
            status, reply = post(url, {"image": b64(image), "k": 6})
            assert status == 200, reply
            expected.append(_answer(reply))

        log: list[tuple[float, int, bool]] = []  # (time, status, whole)
        stop = threading.Event()

        def client(i: int) -> None:
            n = i
            while not stop.is_set():
                status, reply = post(url, {"image": b64(images[n % 4]), "k": 6}, timeout=60)
                log.append((time.monotonic(), status, status == 200 and _answer(reply) == expected[n % 4]))
                n += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(3)
        killed_at = time.monotonic()
        cluster.kill("w1")
        time.sleep(12)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        swapped = _reindex_as_a_ray_job(cluster, f"{s3_base}/cluster-data", cluster_index, model_dirs, url, tmp_path)
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=120)

    before = [e for e in log if e[0] < killed_at]
    after = [e for e in log if e[0] >= killed_at]
    assert before and all(status == 200 for _, status, _ in before)
    answered = [e for e in log if e[1] == 200]
    assert all(whole for _, _, whole in answered), "an answer missed a partition's rows"  # none silently partial
    failed = [e for e in after if e[1] != 200]
    assert all(status == 503 for _, status, _ in failed), {s for _, s, _ in failed}
    last_failure = max((t for t, _, _ in failed), default=killed_at)
    recovered = [e for e in after if e[0] > last_failure]
    assert len(recovered) >= 16 and last_failure - killed_at < 10  # whole again within 10 s, and answering after
    report = {"requests": len(log), "after_kill": len(after), "failed": len(failed),
              "seconds_to_whole": round(last_failure - killed_at, 2), "answered_after_recovery": len(recovered)}
    print("endpoint node loss:", json.dumps(report))

    assert swapped["status"] == "published" and swapped["endpoint"]  # it waited for the endpoint
    assert swapped["served"]["version"] == swapped["version_after"] != swapped["version_before"]
    assert swapped["served"]["rows"] == 64 + 16 and swapped["answer_version"] == swapped["version_after"]


def _reindex_as_a_ray_job(cluster: LocalCluster, data: str, index: str, model_dirs, url: str, tmp_path: Path) -> dict:
    """The lost node replaced (as a cluster's autoscaler would: the job needs a worker's CPUs),
    16 rows added, ``attribution reindex`` submitted with ``ray job submit``; its summary, with
    what the endpoint then serves."""
    cluster.revive(WORKERS)
    add_file(data, "part-night-1.parquet",
             [dict(r, example_id=f"night-{i}") for i, r in enumerate(synthetic_rows(16, seed=32, size=16))])
    (tmp_path / "nightly").mkdir()
    # one actor: the endpoint holds 1.25 CPU, and read tasks need one
    cfg = config(tmp_path / "nightly", index={"actors": 1},
                 reindex={"endpoint": url, "endpoint_timeout_s": 120, "relearn": "changed", "relearn_fraction": 1.0})
    job = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", cluster.jobs_address,
         "--", ATTRIBUTION, "reindex", "--config", cfg, "--dataset", data, "--index", index, "--model",
         model_dirs["text"], "--json"], env=cluster.env, capture_output=True, text=True, timeout=400)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    summary = json.loads(job.stdout[job.stdout.index("{\n"):job.stdout.rindex("\n}") + 2])
    status, reply = post(url, {"image": b64(next(synthetic_rows(1, seed=32, size=16))["image"]), "k": 3})
    assert status == 200, reply
    return {**summary, "served": get(url, "/v1/index")[1], "answer_version": reply["index"]["version"]}
