"""Starting or joining Ray, the one way every stage does it."""

from __future__ import annotations

import logging
import os

import ray

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
# (measured: 13 s -> 9 s per run on 2 CPUs at 0.2 s). Processes of a local Ray read these from
# the environment of the process that starts it; on a cluster, set them in its environment.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def local_settings() -> None:
    """Before starting a local Ray: the settings above, unless the environment sets them."""
    for name, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(name, value)


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))
