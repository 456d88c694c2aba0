"""The index job's featurize actors: how many start, with how many torch threads each, on
which device, and where Ray places them (``index.actors``, ``index.cpus_per_actor``,
``index.gpus_per_actor``, ``index.placement``, ``index.actor_resources``)."""

from __future__ import annotations

import logging
import math
from typing import TypedDict

import ray

from attribution_core.config import ProjectConfig
from attribution_core.errors import ConfigError
from pipelines.ray_runtime import cluster_cpus, cluster_gpus

log = logging.getLogger(__name__)
READ_CPUS = 1  # what Ray Data's read tasks ask for; the actor pool leaves it free


def actor_pool(cfg: ProjectConfig, batches: int) -> tuple[int, int, str]:
    """(actors, torch threads per actor, device). On GPUs, ``index.actors: 0`` starts as many
    as fit in the GPUs free now (an endpoint's fraction of a GPU stays its own); on CPUs one
    per CPU, as many as leave a CPU to the read tasks (fewer would wait forever). Never more
    than the ``batches`` to featurize: an update of a few rows starts one actor (one model
    load), not the pool a full build uses."""
    gpus, cpus = cluster_gpus(), cluster_cpus()
    free = ray.available_resources().get("GPU", 0.0)
    n = cfg.index.actors or (gpu_actors_that_fit(gpus, free, cfg.index.gpus_per_actor) if gpus else cpus)
    if gpus and n * cfg.index.gpus_per_actor > gpus:
        raise ConfigError(f"the index job's {n} actors ask for {n * cfg.index.gpus_per_actor:g} GPU (index.actors x "
                          f"index.gpus_per_actor), more than the cluster's {gpus}: lower index.actors or "
                          "index.gpus_per_actor")
    fit = max(1, math.floor((cpus - READ_CPUS) / cfg.index.cpus_per_actor + 1e-9))
    if n > fit:  # actors holding every CPU would leave none to the read tasks that feed them: a hang
        log.warning("%d index actors of %g CPU would leave the cluster's %d CPU no room for read tasks; starting %d "
                    "(index.actors, index.cpus_per_actor)", n, cfg.index.cpus_per_actor, cpus, fit)
        n = fit
    if 0 < batches < n:
        log.info("%d batch(es) to featurize: starting %d of %d index actors", batches, batches, n)
        n = batches
    threads = cfg.index.threads_per_actor or max(1, cpus // n)
    return n, threads, "cuda" if gpus else "cpu"


def gpu_actors_that_fit(total: int, free: float, per_actor: float) -> int:
    """Actors of ``per_actor`` GPUs that fit in ``free`` of the cluster's ``total`` GPUs (at
    least one). An actor of a whole GPU or more takes only GPUs nobody holds a part of (an
    endpoint's replica of 0.25 GPU keeps its GPU); fractional actors fill what is free."""
    whole_free = total - math.ceil(total - free - 1e-9)
    fit = int(whole_free // per_actor) if per_actor >= 1 else int(free / per_actor + 1e-9)
    if fit < 1:
        log.warning("no GPU is free for the index job (%g of %d free): starting one actor, which waits for one",
                    free, total)
    return max(1, fit)


class ActorPlacement(TypedDict, total=False):
    """Ray's placement options of the index actors (``index.placement``, ``index.actor_resources``)."""
    scheduling_strategy: str
    resources: dict[str, float]


def actor_placement(cfg: ProjectConfig) -> ActorPlacement:
    """Ray's placement options of the actors: ``index.placement`` and ``index.actor_resources``."""
    options: ActorPlacement = {}
    if cfg.index.placement == "SPREAD":
        options["scheduling_strategy"] = "SPREAD"
    if cfg.index.actor_resources:
        options["resources"] = dict(cfg.index.actor_resources)
    return options
