"""How the jobs size themselves to a cluster and behave on one of several nodes, without
starting Ray: GPU actors beside an endpoint, unshared local paths, node losses, stalls."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from attribution_core.config import ClusterConfig, ProjectConfig, from_mapping
from attribution_core.errors import ConfigError
from pipelines import ray_runtime
from pipelines.index.actors import gpu_actors_that_fit


@pytest.mark.parametrize("total, free, per_actor, expected", [
    (8, 8.0, 1.0, 8),     # nothing else on the GPUs: one actor each
    (8, 7.75, 1.0, 7),    # an endpoint replica holds 0.25 of one GPU: that GPU takes no whole-GPU actor
    (8, 7.75, 0.75, 10),  # actors of 0.75 fill the rest: 7 GPUs x 1 + the shared GPU's 0.75
    (8, 7.75, 0.5, 15),
    (4, 2.0, 2.0, 1),     # actors of two GPUs
    (1, 0.25, 1.0, 1),    # nothing fits: one actor, which waits (and the stall watchdog speaks)
])
def test_index_actors_take_the_gpus_the_endpoint_leaves(total, free, per_actor, expected):
    assert gpu_actors_that_fit(total, free, per_actor) == expected


def test_local_paths_are_refused_only_on_several_nodes(monkeypatch):
    monkeypatch.setattr(ray_runtime, "alive_nodes", lambda: 3)
    with pytest.raises(ConfigError, match=r"3 nodes, and data\.uri='/data/train' is a local path"):
        ray_runtime.require_shared_storage(ClusterConfig(), data__uri="/data/train", index__out="s3://b/i")
    ray_runtime.require_shared_storage(ClusterConfig(), data__uri="s3://b/d", index__out="s3://b/i")
    ray_runtime.require_shared_storage(ClusterConfig(shared_filesystem=True), data__uri="/nfs/train")
    monkeypatch.setattr(ray_runtime, "alive_nodes", lambda: 1)
    ray_runtime.require_shared_storage(ClusterConfig(), data__uri="/data/train", index__out="file:///i")


def _node_died() -> Exception:
    return ray.exceptions.NodeDiedError("node 1 died")


def test_node_losses_are_told_from_errors_of_the_job():
    assert ray_runtime.lost_to_node_failure(_node_died())
    try:
        try:
            raise _node_died()
        except Exception as exc:
            raise RuntimeError("the featurize stage failed") from exc
    except RuntimeError as wrapped:
        assert ray_runtime.lost_to_node_failure(wrapped)
    assert not ray_runtime.lost_to_node_failure(ValueError("bad caption column"))
    assert not ray_runtime.lost_to_node_failure(ray.exceptions.RaySystemError("Ray has not been started yet"))


def test_a_job_lost_to_a_node_resumes_and_other_errors_stop_it(monkeypatch):
    monkeypatch.setattr(ray_runtime.time, "sleep", lambda _: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _node_died()
        return "done"

    assert ray_runtime.retry_on_node_loss(flaky, what="a job", retries=3) == "done" and len(calls) == 3
    calls.clear()
    with pytest.raises(ray.exceptions.NodeDiedError):
        ray_runtime.retry_on_node_loss(flaky, what="a job", retries=1)
    assert len(calls) == 2

    def wrong():
        calls.append(1)
        raise ValueError("bad input")

    calls.clear()
    with pytest.raises(ValueError):
        ray_runtime.retry_on_node_loss(wrong, what="a job", retries=3)
    assert len(calls) == 1


def _never(release: threading.Event):
    yield 1
    release.wait()
    yield 2


def test_a_stage_that_stops_progressing_says_what_it_waits_for(monkeypatch, caplog):
    monkeypatch.setattr(ray_runtime, "alive_nodes", lambda: 2)
    monkeypatch.setattr(ray_runtime, "free_resources", lambda: "the cluster has 0 of 2 CPU free on 2 node(s)")
    release = threading.Event()
    got = []
    start = time.monotonic()
    with pytest.raises(ray_runtime.StalledError, match=r"made no progress in \d+ s \(cluster.stall_timeout_s\): it "
                                                        r"asks for 2 actors, and the cluster has 0 of 2 CPU free"):
        for item in ray_runtime.watched(_never(release), what="a stage", asks="2 actors", stall_s=0.6, warn_s=0.2):
            got.append(item)
    release.set()
    assert got == [1] and time.monotonic() - start < 5
    assert "no progress for" in caplog.text  # warned before stopping


def test_a_stall_after_a_node_died_stops_at_once_and_says_to_resume(monkeypatch):
    nodes = iter([3, 2])
    monkeypatch.setattr(ray_runtime, "alive_nodes", lambda: next(nodes))
    monkeypatch.setattr(ray_runtime, "free_resources", lambda: "the cluster has 0 of 2 CPU free on 2 node(s)")
    release = threading.Event()
    with pytest.raises(ray_runtime.ShrunkStallError) as caught:
        list(ray_runtime.watched(_never(release), what="a stage", asks="2 actors", stall_s=600, warn_s=0.2))
    release.set()
    assert "after a node of the cluster died" in str(caught.value) and "Run the same command again" in str(caught.value)
    calls = []

    def stalled():  # not resumed in-process: its stalled work would still hold the resources
        calls.append(1)
        raise caught.value

    with pytest.raises(ray_runtime.ShrunkStallError):
        ray_runtime.retry_on_node_loss(stalled, what="a job", retries=3)
    assert len(calls) == 1


def test_watched_passes_items_and_errors_through(monkeypatch):
    monkeypatch.setattr(ray_runtime, "alive_nodes", lambda: 1)
    assert list(ray_runtime.watched(iter(range(5)), what="s", asks="-", stall_s=5)) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise KeyError("shard")

    with pytest.raises(KeyError):
        list(ray_runtime.watched(broken(), what="s", asks="-", stall_s=5))


@pytest.mark.parametrize("section, values, key", [
    ("serve", {"gpus_per_replica": 1.5}, "serve.gpus_per_replica"),
    ("serve", {"ingress_resources": {"GPU": 1}}, "serve.ingress_resources"),
    ("serve", {"searcher_resources": {"big-memory": 0}}, "serve.searcher_resources"),
    ("serve", {"proxy_location": "Everywhere"}, "serve.proxy_location"),
    ("index", {"gpus_per_actor": 1.5}, "index.gpus_per_actor"),
    ("weights", {"placement": "STRICT"}, "weights.placement"),
    ("index", {"placement": "PACK"}, "index.placement"),
    ("index", {"actor_resources": {"CPU": 2}}, "index.actor_resources"),
    ("cluster", {"node_loss_retries": -1}, "cluster.node_loss_retries"),
    ("cluster", {"stall_timeout_s": -5}, "cluster.stall_timeout_s"),
])
def test_cluster_settings_are_checked(section, values, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_mapping(ProjectConfig, {section: values})
