"""The paper's self-supervised objective for per-group weights, exact and independent of N.

For a learning query q and weights ``w = softmax(theta)`` (M groups), the score of a training
example x is ``tau_w(q, x) = g(q)^T Diag(w) K g(x) = sum_j w_j c_j(q, x)`` with per-group
contributions ``c_j(q, x) = [K (e_j . g(q))]^T g(x)`` (``e_j`` selects group j's
coordinates; K symmetric). The loss (Li et al. 2025, eq. for the weight objective) is

    L(theta) = mean_q [ - mean(top-k_x tau_w(q, x)) / || tau_w(q, .) ||_2 ] + lambda_w ||w||^2

Both terms need only small per-query tensors (ARCHITECTURE §7):

- noise: ``||tau_w(q, .)||^2 = sum_x (sum_j w_j c_j(q, x))^2 = w^T G_q w`` with the moment
  matrix ``G_q = sum_x c(q, x) c(q, x)^T`` (M x M), accumulated in one scan of the index;
  equal to ``q'^T C q'`` for ``q' = K (w . g(q))`` and the Gram C, for any kernel;
- signal: the top-k under the current w lies in a per-query candidate pool of R examples
  whose contributions ``R x M`` are kept; the pool is verified (and grown) by rescanning.

``full_cache_objective`` is the paper's naive form over all N (the reference in tests).
"""

from __future__ import annotations

import torch

from attribution_core.errors import InputError
from attribution_core.features.groups import GroupLayout
from attribution_core.index.kernel import precondition


def weights_from_theta(theta: torch.Tensor) -> torch.Tensor:
    """``w = softmax(theta)``: non-negative, summing to 1 (``Tensor[M]`` or ``[A, M]``)."""
    return torch.softmax(theta, dim=-1)


def group_queries(queries: torch.Tensor, layout: GroupLayout,
                  kernel: list[tuple[int, int, torch.Tensor]] | None) -> torch.Tensor:
    """``Tensor[Q, M, k_total]``: row j is ``K (e_j . g(q))`` (``g(q)`` itself without a kernel)."""
    q, k_total = queries.shape
    out = torch.zeros(q, len(layout.groups), k_total, dtype=torch.float64)
    for j, g in enumerate(layout.groups):
        sl = slice(g.offset, g.offset + g.dim)
        out[:, j, sl] = queries[:, sl].double()
    if kernel:
        out = precondition(out, kernel)  # [Q, M, k] -> K applied to each row
    return out


def contributions(grouped: torch.Tensor, examples: torch.Tensor) -> torch.Tensor:
    """``Tensor[Q, N, M]`` float32 contributions ``c_j(q, x)`` of ``examples`` ``[N, k_total]``."""
    q, m, k = grouped.shape
    c = grouped.reshape(q * m, k).to(torch.float32) @ examples.to(torch.float32).T  # [Q*M, N]
    return c.reshape(q, m, -1).transpose(1, 2)  # [Q, N, M]


def check_pools(width: int, k: int) -> None:
    """Refuse pools narrower than the top-k they are searched for."""
    if k > width:
        raise InputError(f"top-k of {k} needs pools of at least {k} candidates, got {width}; lower weights.top_k "
                         "or index more examples")


def pooled_objective(theta: torch.Tensor, pools: torch.Tensor, valid: torch.Tensor, noise: torch.Tensor,
                     *, k: int, lambda_w: float) -> torch.Tensor:
    """The objective from pools (the scalable form).

    ``pools``: ``Tensor[Q, R, M]`` contributions of each query's candidates; ``valid``:
    ``Tensor[Q, R]`` bool (pools are padded to a common R); ``noise``: ``Tensor[Q, M, M]``
    moment matrices. Returns the mean over the Q queries plus the regulariser.
    """
    check_pools(pools.shape[1], k)
    w = weights_from_theta(theta)
    scores = pools @ w.to(pools.dtype)  # [Q, R]
    scores = scores.masked_fill(~valid, float("-inf"))
    top = torch.topk(scores, k, dim=1).values.mean(dim=1)  # [Q]
    wd = w.to(noise.dtype)
    norm = torch.sqrt(torch.einsum("m,qmn,n->q", wd, noise, wd).clamp_min(1e-30))  # [Q]
    return (-top / norm.to(top.dtype)).mean() + lambda_w * (w**2).sum()


def full_cache_objective(theta: torch.Tensor, cache: torch.Tensor, k: int, lambda_w: float) -> torch.Tensor:
    """The paper's form over the full ``Tensor[Q, N, M]`` cache (reference; small N only)."""
    w = weights_from_theta(theta)
    scores = cache @ w.to(cache.dtype)  # [Q, N]
    top = torch.topk(scores, k, dim=1).values.mean(dim=1)
    return (-top / scores.norm(dim=1)).mean() + lambda_w * (w**2).sum()


def fit_full_cache(cache: torch.Tensor, k: int, lambda_w: float, steps: int, *, learning_rate: float) -> torch.Tensor:
    """``w [M]`` minimising ``full_cache_objective`` over ``cache [Q, N, M]`` from uniform
    (theta = 0) with Adam: the paper's own optimisation, for a universe small enough to cache."""
    if k > cache.shape[1]:
        raise InputError(f"top-k of {k} needs at least {k} training examples, got {cache.shape[1]}")
    theta = torch.zeros(cache.shape[2], dtype=cache.dtype, requires_grad=True)
    optimiser = torch.optim.Adam([theta], lr=learning_rate)
    for _ in range(steps):
        optimiser.zero_grad()
        full_cache_objective(theta, cache, k, lambda_w).backward()
        optimiser.step()
    return weights_from_theta(theta.detach())
