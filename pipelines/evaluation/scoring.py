"""Scores of the LDS queries over the universe, per basis: one index (the universe model's)
or an ensemble of checkpoints (TracIn-CP; the frontier's ensembles), each member with its
own kernel, its scores summed with a coefficient (the checkpoint's learning rate for
TracIn-CP, 1 otherwise)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from attribution_core.answers import UNIFORM
from attribution_core.index.kernel import Kernel, damped_kernel
from attribution_core.index.reader import LoadedIndex
from attribution_core.index.scoring import preconditioned_queries
from attribution_core.weights.artifact import weights_matrix


@dataclasses.dataclass
class Member:
    """One index of a basis's scores: its rows, the queries featurized under its model, and
    the coefficient its scores are summed with."""

    index: LoadedIndex
    features: torch.Tensor  # [Q, k_total] query features under this member's model
    coefficient: float = 1.0


def full_scores(queries: torch.Tensor, weights: torch.Tensor, index: LoadedIndex, kernel: Kernel,
                *, order: list[str]) -> np.ndarray:
    """``[A, Q, N]`` scores of every universe example (dataset order; quarantined rows 0)."""
    wq = preconditioned_queries(queries, weights, index.layout, kernel)  # [A, Q, k_total]
    scores = (wq.reshape(-1, wq.shape[-1]) @ index.features.T).reshape(wq.shape[0], wq.shape[1], -1)
    out = np.zeros((wq.shape[0], wq.shape[1], len(order)))
    position = {eid: i for i, eid in enumerate(order)}
    out[:, :, [position[eid] for eid in index.example_ids]] = scores.double().numpy()
    return out


def ensemble_scores(members: list[Member], weights: torch.Tensor, with_kernel: bool, order: list[str]) -> np.ndarray:
    """``[A, Q, N]``: the members' scores, each under its own kernel, summed with their coefficients."""
    return sum(m.coefficient * full_scores(m.features, weights, m.index, m.index.kernel if with_kernel else None,
                                           order=order)
               for m in members)


@dataclasses.dataclass
class BasisScores:
    """Scores ``[2, Q, N]`` of one basis's LDS queries over the universe (uniform, learned), the
    same at each swept kernel damping, and ``[M, Q, N]`` under each group alone (headroom)."""

    pair: np.ndarray
    by_damping: dict[float, np.ndarray]
    per_group: np.ndarray | None
    learned: np.ndarray  # [M] the learned general weights scored
    groups: list[str]
    kernel_choice: dict[str, Any] | None = None  # the final index's kernel, its damping and how they were chosen


def basis_scores(members: list[Member], document: dict[str, Any], with_kernel: bool, order: list[str],
                 *, damping_grid: tuple[float, ...] = (), headroom: bool = False) -> BasisScores:
    """A basis's scores; the last member is the final model's index (its kernel choice is
    reported, and a damping sweep is run only for a single-member kernel basis)."""
    weights = weights_matrix(document, [UNIFORM, "general"])
    final = members[-1].index
    swept = {d: full_scores(members[0].features, weights, final, damped_kernel(final.stored_features(), final.kernel, d),
                            order=order)
             for d in (damping_grid if with_kernel and len(members) == 1 else ())}
    per_group = (ensemble_scores(members, torch.eye(len(final.layout.groups)), with_kernel, order)
                 if headroom else None)
    stats = final.manifest.stats
    chosen = (stats.get("kernel_choice") or {"rule": "fixed", "kernel": stats["kernel"], "damping": stats["damping"]}
              if with_kernel else None)
    return BasisScores(pair=ensemble_scores(members, weights, with_kernel, order), by_damping=swept,
                       per_group=per_group, learned=np.array(document["aspects"]["general"]["weights"]),
                       groups=list(document["groups"]), kernel_choice=chosen)
