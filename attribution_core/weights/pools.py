"""Candidate pools and moment matrices from scans of the index (ARCHITECTURE §7).

A scan visits the index in blocks of rows. For Q learning queries and A mining weightings it
keeps, per (query, weighting), the R best examples with their per-group contributions
(``Tensor[M]`` each), and optionally accumulates each query's moment matrix
``G_q = sum_x c(q, x) c(q, x)^T`` for the noise term. Partial scans over disjoint row sets
merge exactly (``merge``), so the scan is split across Ray Data tasks freely.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from attribution_core.weights.objective import contributions


@dataclasses.dataclass
class ScanState:
    scores: torch.Tensor  # [Q, A, R] float32, -inf where empty
    contrib: torch.Tensor  # [Q, A, R, M] float32
    ids: np.ndarray  # [Q, A, R] object (str; "" where empty)
    noise: torch.Tensor | None  # [Q, M, M] float64, or None when not accumulated

    @classmethod
    def empty(cls, q: int, a: int, m: int, with_noise: bool) -> ScanState:
        return cls(scores=torch.full((q, a, 0), float("-inf")), contrib=torch.zeros(q, a, 0, m),
                   ids=np.empty((q, a, 0), dtype=object),
                   noise=torch.zeros(q, m, m, dtype=torch.float64) if with_noise else None)


def _keep_best(scores: torch.Tensor, contrib: torch.Tensor, ids: np.ndarray, r: int) -> tuple:
    # [Q, A, n] candidates -> the r best per (query, weighting)
    keep = min(r, scores.shape[2])
    order = torch.topk(scores, keep, dim=2).indices  # [Q, A, keep]
    best_scores = torch.gather(scores, 2, order)
    best_contrib = torch.gather(contrib, 2, order.unsqueeze(-1).expand(-1, -1, -1, contrib.shape[3]))
    best_ids = np.take_along_axis(ids, order.numpy(), axis=2)
    return best_scores, best_contrib, best_ids


def scan_block(state: ScanState, grouped: torch.Tensor, weightings: torch.Tensor, features: torch.Tensor,
               *, ids: list[str], r: int) -> ScanState:
    """Fold a block of index rows (``features`` ``[B, k_total]`` with their ids) into ``state``.

    ``grouped``: ``Tensor[Q, M, k_total]`` from ``group_queries``; ``weightings``: ``[A, M]``.
    """
    c = contributions(grouped, features)  # [Q, B, M]
    s = torch.einsum("qbm,am->qab", c, weightings.to(c.dtype))  # [Q, A, B]
    q, a, b = s.shape
    # The block's own best r per (query, weighting) first: never materialise [Q, A, B, M].
    top_s, top_i = torch.topk(s, min(r, b), dim=2)  # [Q, A, r']
    source = c.unsqueeze(1).expand(q, a, b, c.shape[2])  # a view, not a copy
    top_c = torch.gather(source, 2, top_i.unsqueeze(-1).expand(-1, -1, -1, c.shape[2]))  # [Q, A, r', M]
    top_ids = np.asarray(ids, dtype=object)[top_i.numpy()]  # [Q, A, r']
    best = _keep_best(torch.cat([state.scores, top_s], dim=2), torch.cat([state.contrib, top_c], dim=2),
                      np.concatenate([state.ids, top_ids], axis=2), r)
    noise = state.noise
    if noise is not None:
        cd = c.double()
        noise = noise + torch.einsum("qbm,qbn->qmn", cd, cd)  # sum over the block's rows
    return ScanState(*best, noise=noise)


def merge(a: ScanState, b: ScanState, r: int) -> ScanState:
    """The state of the union of two disjoint row sets."""
    best = _keep_best(torch.cat([a.scores, b.scores], 2), torch.cat([a.contrib, b.contrib], 2),
                      np.concatenate([a.ids, b.ids], axis=2), r)
    noise = None if a.noise is None or b.noise is None else a.noise + b.noise
    return ScanState(*best, noise=noise)


@dataclasses.dataclass
class Pools:
    """Per-query candidates, padded to a common size R."""

    ids: np.ndarray  # [Q, R] object ("" = padding)
    contrib: torch.Tensor  # [Q, R, M] float64
    valid: torch.Tensor  # [Q, R] bool

    @property
    def sizes(self) -> list[int]:
        return self.valid.sum(1).tolist()


def _pad(rows: list[tuple[list[str], list[torch.Tensor]]], m: int) -> Pools:
    r = max((len(ids) for ids, _ in rows), default=0)
    q = len(rows)
    ids = np.full((q, r), "", dtype=object)
    contrib = torch.zeros(q, r, m, dtype=torch.float64)
    valid = torch.zeros(q, r, dtype=torch.bool)
    for i, (row_ids, row_c) in enumerate(rows):
        n = len(row_ids)
        ids[i, :n] = row_ids
        if n:
            contrib[i, :n] = torch.stack(row_c).double()
        valid[i, :n] = True
    return Pools(ids=ids, contrib=contrib, valid=valid)


def pools_from_state(state: ScanState) -> Pools:
    """Union, per query, of the candidates of every mining weighting."""
    q, a, r = state.ids.shape
    rows = []
    for i in range(q):
        seen: dict[str, torch.Tensor] = {}
        for j in range(a):
            for n in range(r):
                eid = state.ids[i, j, n]
                if eid and eid not in seen and torch.isfinite(state.scores[i, j, n]):
                    seen[eid] = state.contrib[i, j, n]
        rows.append((list(seen), list(seen.values())))
    return _pad(rows, state.contrib.shape[3])


def extend_pools(pools: Pools, found: ScanState) -> tuple[Pools, list[float]]:
    """Add the examples of ``found`` (a rescan under the learned weights, A = 1, R = k)
    missing from each pool. Returns the new pools and, per query, the share of its true
    top-k that the old pool already held (the pool recall)."""
    q = pools.ids.shape[0]
    rows, recall = [], []
    for i in range(q):
        ids = [e for e, ok in zip(pools.ids[i], pools.valid[i].tolist()) if ok]
        contrib = [pools.contrib[i, n] for n in range(len(ids))]
        have = set(ids)
        top = [(e, c) for e, c, s in zip(found.ids[i, 0], found.contrib[i, 0], found.scores[i, 0]) if e and torch.isfinite(s)]
        hits = sum(e in have for e, _ in top)
        recall.append(hits / len(top) if top else 1.0)
        for e, c in top:
            if e not in have:
                ids.append(e)
                contrib.append(c)
                have.add(e)
        rows.append((ids, contrib))
    return _pad(rows, pools.contrib.shape[2]), recall


def stack_pools(parts: list[Pools]) -> Pools:
    """One ``Pools`` of the queries of ``parts`` (in order), each padded to the widest."""
    width = max(p.contrib.shape[1] for p in parts)
    return Pools(
        ids=np.concatenate([np.pad(p.ids, ((0, 0), (0, width - p.ids.shape[1])), constant_values="") for p in parts]),
        contrib=torch.cat([torch.nn.functional.pad(p.contrib, (0, 0, 0, width - p.contrib.shape[1])) for p in parts]),
        valid=torch.cat([torch.nn.functional.pad(p.valid, (0, width - p.valid.shape[1])) for p in parts]))


def grow_pools(pools: Pools, found: ScanState, rows: dict[str, slice]) -> tuple[Pools, dict[str, list[float]]]:
    """After a rescan under each aspect's learned weights (``found``: weighting ``i`` is the
    ``i``-th aspect of ``rows``, R = k), each aspect's pools (its query ``rows``) grown by the
    true top-k examples they missed, re-padded to one width; and each aspect's pool recall
    per query (``extend_pools``)."""
    grown, recall = [], {}
    for i, (aspect, part) in enumerate(rows.items()):
        mine = ScanState(found.scores[part, i : i + 1], found.contrib[part, i : i + 1], found.ids[part, i : i + 1], None)
        extended, recall[aspect] = extend_pools(Pools(pools.ids[part], pools.contrib[part], pools.valid[part]), mine)
        grown.append(extended)
    return stack_pools(grown), recall


def mining_weightings(m: int, extra: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``[A, M]``: uniform, each group alone, and any ``extra`` weightings."""
    rows = [torch.full((m,), 1.0 / m)] + [torch.eye(m)[j] for j in range(m)] + list(extra or [])
    return torch.stack(rows).float()
