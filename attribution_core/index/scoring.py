"""Attribution scores and exact top-k.

With per-group features ``g(q) = [g_1(q) ... g_M(q)]`` and weights ``w`` (one per group),
the weighted score is (paper eq. for tau_w with K = I, or after the query side has been
preconditioned, ``q' = K (w (.) g(q))``, ARCHITECTURE §6):

    tau_w(q, x) = sum_j w_j <g_j(q), g_j(x)> = <w_expanded (.) g(q), g(x)>

Weights act on the query side only, so A weightings of Q queries are one GEMM of an
``[A*Q, k_total]`` matrix against the index. Top-k is exact: the index is scanned in blocks
and each block's candidates are merged with the running best. The returned scores always
equal a full sort's; among examples tied exactly at the k-th score, which index is kept
is unspecified.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from attribution_core.errors import InputError
from attribution_core.features.groups import GroupLayout


def expand_weights(weights: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``Tensor[A, M]`` group weights -> ``Tensor[A, k_total]`` per-coordinate weights."""
    if weights.dim() == 1:
        weights = weights.unsqueeze(0)
    if weights.shape[1] != len(layout.groups):
        raise InputError(
            f"weights have {weights.shape[1]} entries per weighting but the layout has "
            f"{len(layout.groups)} groups ({', '.join(layout.group_names)})"
        )
    sizes = torch.tensor([g.dim for g in layout.groups])
    return torch.repeat_interleave(weights, sizes, dim=1)  # [A, M] -> [A, k_total]


def group_inner_products(queries: torch.Tensor, examples: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``Tensor[Q, N, M]``: ``<g_j(q), g_j(x)>`` for every query, example and group.

    ``queries`` is ``Tensor[Q, k_total]``, ``examples`` ``Tensor[N, k_total]``. Materialises
    Q x N x M numbers: meant for small sets (tests, learning pools), not the whole index.
    """
    out = torch.empty(queries.shape[0], examples.shape[0], len(layout.groups), dtype=queries.dtype)
    for j, g in enumerate(layout.groups):
        sl = slice(g.offset, g.offset + g.dim)
        out[:, :, j] = queries[:, sl] @ examples[:, sl].T  # [Q, k_j] @ [k_j, N]
    return out


def weighted_queries(queries: torch.Tensor, weights: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``Tensor[A, Q, k_total]``: each query scaled per group by each of A weightings."""
    w = expand_weights(weights.to(queries.dtype), layout)  # [A, k_total]
    return w[:, None, :] * queries[None, :, :]


def weighted_scores(
    queries: torch.Tensor, examples: torch.Tensor, weights: torch.Tensor, layout: GroupLayout
) -> torch.Tensor:
    """``Tensor[A, Q, N]``: ``sum_j w_aj <g_j(q), g_j(x)>`` as one GEMM."""
    wq = weighted_queries(queries, weights, layout)  # [A, Q, k]
    a, q, k = wq.shape
    return (wq.reshape(a * q, k) @ examples.to(wq.dtype).T).reshape(a, q, -1)


def _merge(
    best_v: torch.Tensor, best_i: torch.Tensor, v: torch.Tensor, i: torch.Tensor, *, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    # [Q, k] running best + [Q, kk] block candidates -> [Q, k]
    all_v = torch.cat([best_v, v], dim=1)
    all_i = torch.cat([best_i, i], dim=1)
    order = torch.sort(all_v, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(all_v, 1, order), torch.gather(all_i, 1, order)


def merged_topk(score_blocks: Iterable[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over scores given as consecutive column blocks ``Tensor[Q, n_b]`` of a
    ``[Q, N]`` score matrix. Returns scores and global column indices, ``Tensor[Q, min(k, N)]``."""
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    best_v = best_i = None
    start = 0
    for scores in score_blocks:
        n = scores.shape[1]
        if best_v is None:
            best_v = scores.new_empty(scores.shape[0], 0)
            best_i = torch.empty(scores.shape[0], 0, dtype=torch.long, device=scores.device)
        if n == 0:
            continue
        v, order = torch.topk(scores, min(k, n), dim=1)  # [Q, kk], O(n_b) per query
        best_v, best_i = _merge(best_v, best_i, v, order + start, k=k)
        start += n
    return best_v, best_i


def streaming_topk(
    queries: torch.Tensor, blocks: Iterable[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``queries @ X^T`` over an index given as consecutive row blocks of X.

    ``queries``: ``Tensor[Q, k_total]`` (already weighted/preconditioned);
    ``blocks``: iterable of ``Tensor[n_b, k_total]``. Returns scores and global row indices,
    both ``Tensor[Q, min(k, N)]``, best first. Memory is O(Q * (k + block size)).
    """
    best_v, best_i = merged_topk((queries @ block.to(queries.dtype).T for block in blocks), k)  # [Q, n_b] each
    if best_v is None:  # no blocks at all
        return queries.new_empty(queries.shape[0], 0), torch.empty(queries.shape[0], 0, dtype=torch.long)
    return best_v, best_i


def topk_reference(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full stable argsort of ``Tensor[Q, N]`` scores: the reference for ``streaming_topk``."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return torch.gather(scores, 1, order), order


def preconditioned_queries(queries: torch.Tensor, weights: torch.Tensor, layout: GroupLayout,
                           kernel: list[tuple[int, int, torch.Tensor]] | None) -> torch.Tensor:
    """``Tensor[A, Q, k_total]`` float32: ``q'_a = K (w_a . g(q))`` for A weightings at once.

    K is linear, so ``K (w_a . g) = sum_j w_aj K (e_j . g)``: each kernel block is applied
    once per query and per group it overlaps (together one matvec of K), then combined per
    weighting. Applying K per weighting would cost A matvecs. Computed in float64.
    """
    w = weights.double()
    if w.dim() == 1:
        w = w.unsqueeze(0)
    expand_weights(w, layout)  # validates the shape against the layout
    g = queries.double()
    if not kernel:
        return weighted_queries(g, w, layout).float()
    out = torch.zeros(w.shape[0], g.shape[0], layout.k_total, dtype=torch.float64)
    covered = torch.zeros(layout.k_total, dtype=torch.bool)
    for offset, dim, block in kernel:
        b_end = offset + dim
        covered[offset:b_end] = True
        for j, grp in enumerate(layout.groups):
            lo, hi = max(offset, grp.offset), min(b_end, grp.offset + grp.dim)
            if lo >= hi:
                continue
            part = g[:, lo:hi] @ block[lo - offset : hi - offset].to(torch.float64)  # [Q, dim]: K (e_j . g)
            out[:, :, offset:b_end] += w[:, j, None, None] * part[None]
    if not bool(covered.all()):  # coordinates outside every kernel block: K acts as I there
        outside = ~covered
        out[:, :, outside] = weighted_queries(g, w, layout)[:, :, outside]
    return out.float()


def attribute(queries: torch.Tensor, weights: torch.Tensor, layout: GroupLayout,
              kernel: list[tuple[int, int, torch.Tensor]] | None, *, blocks: Iterable[torch.Tensor], k: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k under A weightings at once (general, aspects, uniform): one GEMM per index block.

    ``queries``: ``Tensor[Q, k_total]`` features; ``weights``: ``Tensor[A, M]``; ``kernel``:
    ``(offset, dim, K_b)`` blocks or None (K = I). Scores are ``tau_w(q, x) = q'^T g(x)`` with
    ``q' = K (w . g(q))`` (ARCHITECTURE §6). Returns scores and row indices, ``Tensor[A, Q, k]``.
    """
    wq = preconditioned_queries(queries, weights, layout, kernel)  # [A, Q, k_total]
    a, q, k_total = wq.shape
    scores, idx = streaming_topk(wq.reshape(a * q, k_total), blocks, k)
    return scores.reshape(a, q, -1), idx.reshape(a, q, -1)


def heldout_objective(top_scores: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor, lambda_w: float) -> float:
    """The weight objective (the paper's self-supervised loss, ``weights.objective``) of
    ``weights [M]`` on queries whose top-k scores under them are ``top_scores [Q, k]`` and
    whose moment matrices are ``noise [Q, M, M]``:
    ``mean_q(-mean(top-k) / sqrt(w^T G_q w)) + lambda_w ||w||^2``. Held-out shrinkage and the
    damping choice both score with it, so it lives below both."""
    w = weights.double()
    norm = torch.sqrt(torch.einsum("m,qmn,n->q", w, noise.double(), w).clamp_min(1e-30))
    return float((-top_scores.double().mean(dim=1) / norm).mean() + lambda_w * (w**2).sum())
