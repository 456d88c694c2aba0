"""Optimising theta on Ray Train: queries split across workers, gradient all-reduced (DDP).

theta is ``[A, M]``: one row per aspect, each optimised on that aspect's queries only (the
rows share nothing, so one run trains every aspect). Every worker holds a slice of every
aspect's queries; its loss is scaled so that DDP's average of the workers' gradients is the
gradient of the mean over all queries. Rank 0 checkpoints theta and the trajectory with
``ray.train.report``; a restarted worker group resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from typing import Any

import numpy as np
import torch
from torch import nn

from attribution_core.config import WeightsConfig
from attribution_core.data.storage import filesystem_for
from attribution_core.errors import AttributionError
from attribution_core.weights.objective import check_pools, pooled_objective
from pipelines.failures import decode_error, encode_error

CHECKPOINT_FILE = "theta.json"
OPTIMIZER_FILE = "adam.pt"  # the optimiser's moments: a resumed run takes the steps an undisturbed one takes


@dataclasses.dataclass(frozen=True)
class AspectPools:
    """One aspect's queries as the objective reads them (``weights.objective``): ``contrib``
    ``[Q, P, M]``, each pooled candidate's score contribution per parameter group; ``valid``
    ``[Q, P]``, which pool slots hold a candidate; ``noise`` ``[Q, M, M]``, the moments of the
    query's per-group scores over the training set."""

    contrib: np.ndarray
    valid: np.ndarray
    noise: np.ndarray

    def rows(self, rank: int, world: int) -> dict[str, torch.Tensor]:
        """This worker's queries (query i goes to worker i mod world) as tensors."""
        take = slice(rank, None, world)  # copied: arrays from Ray's object store are read-only
        return {"contrib": torch.tensor(np.asarray(self.contrib)[take]),
                "valid": torch.tensor(np.asarray(self.valid)[take]),
                "noise": torch.tensor(np.asarray(self.noise)[take])}


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """What every Ray Train worker of ``train_loop`` gets: the weight-learning settings, each
    aspect's pools, and theta ``[A, M]`` to start from (one row per aspect)."""

    weights: WeightsConfig
    aspects: tuple[AspectPools, ...]
    theta: np.ndarray


@dataclasses.dataclass(frozen=True)
class LoopRefusal:
    """``train_loop``'s answer when the input is refused (``encode_error``'s form of the error)."""

    error: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Optimised:
    """theta ``[A, M]`` after the last step, and the objective every ``report_every`` steps."""

    theta: np.ndarray
    trajectory: list[dict[str, float]]


class Theta(nn.Module):
    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(init.clone())

    def forward(self) -> torch.Tensor:
        return self.theta


def _local_loss(theta: torch.Tensor, parts: list[dict[str, torch.Tensor]], totals: list[int], world: int,
                *, k: int, lambda_w: float) -> torch.Tensor:
    loss = theta.new_zeros(())
    for a, part in enumerate(parts):
        n = part["contrib"].shape[0]
        if n:
            # mean over this worker's queries x (its share of the aspect) x world: DDP's mean of
            # the workers' gradients is then the gradient of the mean over all the aspect's queries.
            term = pooled_objective(theta[a], part["contrib"], part["valid"], part["noise"], k=k, lambda_w=0.0)
            loss = loss + term * n / totals[a] * world
        loss = loss + lambda_w * (torch.softmax(theta[a], -1) ** 2).sum()
    return loss


def train_loop(config: dict[str, LoopConfig]) -> LoopRefusal | None:
    """Ray Train's training function; ``config["loop"]`` is its ``LoopConfig`` (Ray Train
    hands a training function a mapping). An ``AttributionError`` (bad input, the same on
    every worker since every worker checks the whole input first) is returned, not raised:
    Ray Train would retry the run, which cannot help; ``optimise`` raises it on the driver."""
    loop = config["loop"]
    try:
        for aspect in loop.aspects:
            check_pools(np.asarray(aspect.contrib).shape[1], loop.weights.top_k)
        _optimise_theta(loop)
    except AttributionError as exc:
        return LoopRefusal(encode_error(exc))
    return None


def _optimise_theta(loop: LoopConfig) -> None:
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    wcfg = loop.weights
    parts = [aspect.rows(rank, world) for aspect in loop.aspects]
    totals = [len(aspect.contrib) for aspect in loop.aspects]
    theta0, start, trajectory, moments = torch.tensor(np.asarray(loop.theta), dtype=torch.float64), 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = json.loads(open(os.path.join(d, CHECKPOINT_FILE)).read())
            moments = torch.load(os.path.join(d, OPTIMIZER_FILE), weights_only=True)
        theta0, start, trajectory = torch.tensor(saved["theta"], dtype=torch.float64), saved["step"], saved["trajectory"]
    module: nn.Module = Theta(theta0)
    if world > 1:
        module = nn.parallel.DistributedDataParallel(module)
    opt = torch.optim.Adam(module.parameters(), lr=wcfg.learning_rate)
    if moments is not None:
        opt.load_state_dict(moments)
    steps, every = wcfg.steps, wcfg.report_every
    for step in range(start, steps):
        opt.zero_grad()
        loss = _local_loss(module(), parts, totals, world, k=wcfg.top_k, lambda_w=wcfg.lambda_w)
        loss.backward()
        opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            value = loss.detach().clone()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            trajectory.append({"step": step + 1, "objective": float(value)})
            theta = module.module.theta if world > 1 else module.theta
            state = {"theta": theta.detach().tolist(), "step": step + 1, "trajectory": trajectory}
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    with open(os.path.join(d, CHECKPOINT_FILE), "w") as f:
                        json.dump(state, f)
                    torch.save(opt.state_dict(), os.path.join(d, OPTIMIZER_FILE))
                ray.train.report({"step": step + 1, "objective": float(value)},
                                 checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


def optimise(aspects: list[AspectPools], theta: np.ndarray, wcfg: WeightsConfig, storage: TrainStorage,
             *, name: str) -> Optimised:
    """Run ``train_loop`` on ``weights.workers`` Ray Train workers (``top_k``, ``lambda_w``,
    ``steps``, ``learning_rate`` and ``report_every`` of ``wcfg``); returns theta and the
    trajectory.

    Several workers all-reduce their gradients over a gloo process group (``TorchTrainer``).
    One worker has nothing to reduce, so it runs without a process group: Ray Train's base
    trainer with the same loop, checkpoints and retries, which starts about 3 s sooner (its
    controller does not import torch and no rendezvous is set up)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    common = dict(
        train_loop_config={"loop": LoopConfig(weights=wcfg, aspects=tuple(aspects), theta=np.asarray(theta))},
        scaling_config=ScalingConfig(num_workers=wcfg.workers, use_gpu=False, resources_per_worker={"CPU": 0.5},
                                     placement_strategy=wcfg.placement),
        # A failed worker group (a node lost) restarts from the last checkpoint (train_loop reads it back).
        run_config=RunConfig(storage_path=storage.path, storage_filesystem=storage.filesystem, name=name,
                             failure_config=FailureConfig(max_failures=2)),
    )
    if wcfg.workers > 1:
        from ray.train.torch import TorchConfig, TorchTrainer

        trainer = TorchTrainer(train_loop, torch_config=TorchConfig(backend="gloo"), **common)
    else:
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        trainer = DataParallelTrainer(train_loop, **common)
    result = trainer.fit()
    if isinstance(result.return_value, LoopRefusal):
        raise decode_error(result.return_value.error)
    with result.checkpoint.as_directory() as d:
        saved = json.loads(open(os.path.join(d, CHECKPOINT_FILE)).read())
    return Optimised(theta=np.asarray(saved["theta"]), trajectory=saved["trajectory"])


@dataclasses.dataclass(frozen=True)
class TrainStorage:
    """Where Ray Train keeps its run folders (theta's checkpoints) during learn-weights. Every
    worker writes there and the controller reads it back, so on a cluster of several nodes it
    is beside the index (object storage, or ``cluster.shared_filesystem``), on one node a
    temporary folder."""

    path: str
    filesystem: Any = None  # pyarrow filesystem of ``path``; None: local

    @classmethod
    def open(cls, index_uri: str, shared: bool) -> TrainStorage:
        if not shared:
            return cls(tempfile.mkdtemp(prefix="learn-weights-"))
        fs, root = filesystem_for(index_uri)
        return cls(f"{root}/_train/{uuid.uuid4().hex[:12]}", fs)

    def remove(self) -> None:
        """theta is returned; the run folders are not kept."""
        if self.filesystem is None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            self.filesystem.delete_dir(self.path)
        except OSError:  # nothing was written, or a partial delete: it holds no result
            pass
