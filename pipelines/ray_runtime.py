"""Starting or joining Ray, the one way every stage does it."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import ray

from attribution_core.config import ClusterConfig
from attribution_core.errors import AttributionError, ConfigError

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, num_cpus: int | None = None,
               object_store_bytes: int | None = None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local Ray.

    A local Ray is started with ``address="local"`` so a stray ``ray start`` cluster on the
    machine is never joined by accident, and without the dashboard. Already initialised
    (a test session, a notebook): nothing to do.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    local_settings()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             object_store_memory=object_store_bytes)
    log.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))


# Ray Train's controller looks at its workers every 2 s by default; the weight optimisation's
# runs last seconds, so each round would wait up to that long to start and to be seen done
# (measured: 13 s -> 9 s per run on 2 CPUs at 0.2 s). Its preemption watcher (an actor that
# follows the autoscaler's notices of nodes about to go) has nothing to watch on one machine,
# and stopping it held each run about 1 s longer (measured on 2 CPUs, 8 runs each: 2.0 s from
# the loop's end to fit's return with it, 1.0 s without). Processes of a local Ray read these
# from the environment of the process that starts it; on a cluster, set them in its environment.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def local_settings() -> None:
    """Before starting a local Ray: the settings above, unless the environment sets them."""
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def alive_nodes() -> int:
    """Nodes of the joined cluster that are alive."""
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def is_local_path(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def require_shared_storage(cluster: ClusterConfig, **uris: str | None) -> None:
    """On a cluster of several nodes, refuse local paths (keyword: the config key they came
    from) unless ``cluster.shared_filesystem`` says every node mounts them at that path: each
    node would read its own disk (Ray Data lists a local path on the driver's node only) and
    write shards the others never see."""
    local = {key: uri for key, uri in uris.items() if uri and is_local_path(uri)}
    if not local or cluster.shared_filesystem:
        return
    nodes = alive_nodes()
    if nodes > 1:
        named = ", ".join(f"{key.replace('__', '.')}={uri!r}" for key, uri in local.items())
        raise ConfigError(f"the Ray cluster has {nodes} nodes, and {named} is a local path that the other nodes "
                          "do not share: put it on object storage (an s3://bucket/prefix URI), or, if it is on a "
                          "filesystem mounted at the same path on every node, set cluster.shared_filesystem: true")


_NODE_LOSS = (ray.exceptions.NodeDiedError, ray.exceptions.ActorDiedError, ray.exceptions.ObjectLostError,
              ray.exceptions.OwnerDiedError, ray.exceptions.WorkerCrashedError, ray.exceptions.ActorUnavailableError,
              ray.exceptions.LocalRayletDiedError)


def lost_to_node_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it, through Ray's task errors and Python's chain) is a
    node, worker or object lost to a machine that died, not an error of the job's own code."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, _NODE_LOSS):
            return True
        cause = getattr(e, "cause", None)  # a RayTaskError's error on the worker
        stack += [e.__cause__, e.__context__, cause if isinstance(cause, BaseException) else None]
    return False


T = TypeVar("T")


def retry_on_node_loss(run: Callable[[], T], *, what: str, retries: int) -> T:
    """``run()``, run again (up to ``retries`` times) when it failed because a node of the
    cluster died: ``run`` must resume its own work (the index job resumes its version)."""
    for attempt in range(retries + 1):
        try:
            return run()
        except Exception as exc:
            if attempt == retries or not lost_to_node_failure(exc):
                raise
            cause = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            log.warning("%s lost a node of the Ray cluster (%s); resuming (retry %s, cluster.node_loss_retries)",
                        what, cause, f"{attempt + 1} of {retries}")
            time.sleep(2.0)  # let the cluster see the node dead before placing work again
    raise AssertionError("unreachable")


class StalledError(AttributionError, RuntimeError):
    """A stage made no progress for ``cluster.stall_timeout_s``."""


class ShrunkStallError(StalledError):
    """A stage stopped making progress after a node of the cluster died: the work Ray moved
    to the nodes left does not fit them (e.g. restarted actors hold the CPUs that read tasks
    need). Not resumed in the same process, whose stalled work still holds its resources: the
    message says to run the command again, which resumes sized to the cluster as it is then."""


def free_resources() -> str:
    """What the cluster has free, of its total, for a message about work that waits."""
    total, free = ray.cluster_resources(), ray.available_resources()
    parts = [f"{free.get(k, 0):g} of {total[k]:g} {k}" for k in ("CPU", "GPU") if total.get(k)]
    return f"the cluster has {', '.join(parts) or 'no CPU or GPU'} free on {alive_nodes()} node(s)"


def watched(items: Iterable[T], *, what: str, asks: str, stall_s: float, warn_s: float = 60.0) -> Iterator[T]:
    """``items`` as they come, with a watchdog: a warning every ``warn_s`` without a new item
    (what the stage ``asks`` for, what the cluster has free), and ``StalledError`` after
    ``stall_s`` (0 = never); ``ShrunkStallError`` at the first warning when a node died since
    the start. The items are drawn on a thread of their own, so a wait that Ray never ends
    cannot hold the caller."""
    box: queue.Queue = queue.Queue(maxsize=256)
    end = object()

    def pump() -> None:
        try:
            for item in items:
                box.put(item)
            box.put(end)
        except BaseException as exc:  # handed to the caller
            box.put(_Raised(exc))

    threading.Thread(target=pump, name=f"watched {what}", daemon=True).start()
    last = time.monotonic()
    nodes = alive_nodes()
    while True:
        try:
            item = box.get(timeout=min(warn_s, stall_s) if stall_s else warn_s)
        except queue.Empty:
            waited = time.monotonic() - last
            if alive_nodes() < nodes:
                raise ShrunkStallError(f"{what} made no progress for {waited:.0f} s after a node of the cluster died: "
                                       f"it asks for {asks}, and {free_resources()}. Run the same command again: it "
                                       "resumes (what was written is kept), sized to the nodes left") from None
            if stall_s and waited >= stall_s:
                raise StalledError(f"{what} made no progress in {waited:.0f} s (cluster.stall_timeout_s): it asks for "
                                   f"{asks}, and {free_resources()}. Give the cluster the resources, or lower what "
                                   "the stage asks for") from None
            log.warning("%s: no progress for %.0f s; it asks for %s, and %s", what, waited, asks, free_resources())
            continue
        if item is end:
            return
        if isinstance(item, _Raised):
            raise item.exc
        last = time.monotonic()
        yield item


@dataclasses.dataclass
class _Raised:
    exc: BaseException
