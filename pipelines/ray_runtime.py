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
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             object_store_memory=object_store_bytes)
    log.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))
