"""Preconditioner statistics: Gram ``C = Phi^T Phi`` and kernel ``K = (C + lambda I)^-1``.

``Phi`` is the ``[N, k_total]`` matrix of stored training features (TRAK / D-TRAK use
``(Phi^T Phi)^-1``; a damping ``lambda`` keeps it well conditioned when N is small or
features are collinear). C is accumulated in float64 from partial sums over shards, so the
result does not depend on how the index is split. When ``k_total`` is too large for one
``k_total x k_total`` matrix, C and K are block-diagonal: one block per parameter group
(cross-group covariance is dropped; say so in the manifest).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import torch

from attribution_core.features.groups import GroupLayout
from attribution_core.index.schema import flat_matrix, group_matrix

Kernel = list[tuple[int, int, torch.Tensor]]
"""A version's kernel as ``(offset, dim, K_b)`` blocks (float64) along the feature columns."""

FULL = "full"
BLOCK_DIAGONAL = "block_diagonal"  # one block per parameter group
LAYER_BLOCK = "layer_block"  # one block per tracked layer, whatever the grouping
FULL_BLOCK = "all"  # block name of a full kernel
OBJECTIVE = "objective"  # the structure chosen with the damping (attribution_core.index.damping)


def kernel_candidates(mode: str, k_total: int, max_full_dim: int) -> list[str]:
    """The kernel structures ``mode`` leaves open: one, or under ``'objective'`` the group- and
    layer-blocked kernels (and the full one when ``k_total <= max_full_dim``). 'auto' is the
    full kernel when it fits, else block-diagonal."""
    if mode == "auto":
        return [FULL if k_total <= max_full_dim else BLOCK_DIAGONAL]
    if mode == OBJECTIVE:
        return ([FULL] if k_total <= max_full_dim else []) + [BLOCK_DIAGONAL, LAYER_BLOCK]
    return [mode]


def blocks(layout: GroupLayout, kind: str) -> list[tuple[str, int, int]]:
    """``(name, offset, dim)`` of each kernel block."""
    if kind == FULL:
        return [(FULL_BLOCK, 0, layout.k_total)]
    if kind == LAYER_BLOCK:
        return [(layer.name, layer.offset, layer.dim) for layer in layout.layers]
    return [(g.name, g.offset, g.dim) for g in layout.groups]


def coarsest(kinds: list[str]) -> str:
    """The kernel structure whose Gram blocks contain every other's of ``kinds``: full, then
    group blocks (each holds its layers), then layer blocks."""
    return next(k for k in (FULL, BLOCK_DIAGONAL, LAYER_BLOCK) if k in kinds)


def sub_grams(grams: list[tuple[str, int, int, np.ndarray]], layout: GroupLayout,
              kind: str) -> list[tuple[str, int, int, np.ndarray]]:
    """The ``(name, offset, dim, C_b)`` Gram blocks of ``kind``, sliced out of coarser ones."""
    out = []
    for name, offset, dim in blocks(layout, kind):
        outer = next((g for g in grams if g[1] <= offset and offset + dim <= g[1] + g[2]), None)
        if outer is None:
            raise ValueError(f"kernel block {name} [{offset}, {offset + dim}) lies in no Gram block given")
        lo = offset - outer[1]
        out.append((name, offset, dim, outer[3][lo : lo + dim, lo : lo + dim]))
    return out


def partial_gram(tables: Iterable[pa.Table], layout: GroupLayout, kind: str) -> dict[str, np.ndarray]:
    """``{block: sum_x g_b(x) g_b(x)^T}`` (float64 ``[d_b, d_b]``) over the rows of ``tables``."""
    out = {name: np.zeros((dim, dim), dtype=np.float64) for name, _, dim in blocks(layout, kind)}
    for table in tables:
        if table.num_rows == 0:
            continue
        if kind == FULL:
            x = flat_matrix(table, layout, np.float64, scaled=False)  # [n, k_total]
            out[FULL_BLOCK] += x.T @ x
        elif kind == LAYER_BLOCK:
            x = flat_matrix(table, layout, np.float64, scaled=False)
            for name, offset, dim in blocks(layout, kind):
                out[name] += x[:, offset : offset + dim].T @ x[:, offset : offset + dim]
        else:
            for g in layout.groups:
                x = group_matrix(table, g.name).astype(np.float64)  # [n, k_g]
                out[g.name] += x.T @ x
    return out


def add_grams(total: dict[str, np.ndarray] | None, part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    total = {} if total is None else total
    for k, v in part.items():
        if k in total:
            total[k] += v
        else:
            total[k] = v.copy()
    return total


class GramEigen:
    """A Gram block ``C = V diag(e) V^T`` decomposed once (float64), so the kernel at any
    damping costs no second decomposition: ``lambda = damping * trace(C) / d`` (``damping``
    itself when C is zero)."""

    def __init__(self, gram: np.ndarray) -> None:
        d = gram.shape[0]
        self.scale = float(np.trace(gram)) / d if d else 0.0
        values, self.vectors = np.linalg.eigh((gram + gram.T) / 2)
        self.values = np.clip(values, 0.0, None)  # e >= 0 up to rounding

    def damping_lambda(self, damping: float) -> float:
        return damping * self.scale if self.scale > 0 else damping

    def kernel(self, damping: float) -> np.ndarray:
        """``K = (C + lambda I)^-1 = V diag(1/(e + lambda)) V^T``, symmetric."""
        kernel = (self.vectors / (self.values + self.damping_lambda(damping))) @ self.vectors.T
        return (kernel + kernel.T) / 2

    def apply(self, queries: np.ndarray, damping: float) -> np.ndarray:
        """``queries [..., d] @ K`` without forming K."""
        return ((queries @ self.vectors) / (self.values + self.damping_lambda(damping))) @ self.vectors.T


def kernel_from_gram(gram: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """``(K, lambda)``: ``K = (C + lambda I)^-1`` with ``lambda = damping * trace(C) / d``
    (``damping`` itself when C is zero), via a symmetric eigendecomposition in float64."""
    eigen = GramEigen(gram)
    return eigen.kernel(damping), eigen.damping_lambda(damping)


def damped_kernel(features: torch.Tensor, kernel_blocks: list[tuple[int, int, torch.Tensor]],
                  damping: float) -> list[tuple[int, int, torch.Tensor]]:
    """The kernel of the same blocks as ``kernel_blocks`` rebuilt from the stored (unscaled)
    rows ``features [N, k_total]`` with another ``damping`` (the index's own when it is the
    same number)."""
    rows = features.double().numpy()
    out = []
    for offset, dim, _ in kernel_blocks:
        x = rows[:, offset : offset + dim]
        out.append((offset, dim, torch.from_numpy(kernel_from_gram(x.T @ x, damping)[0])))
    return out


def precondition(queries: torch.Tensor, kernel_blocks: list[tuple[int, int, torch.Tensor]]) -> torch.Tensor:
    """``q' = K q`` for ``Tensor[..., k_total]`` queries and a (block-diagonal) kernel given
    as ``(offset, dim, K_b)`` blocks (K symmetric, so each block acts as ``q_b @ K_b``)."""
    out = queries.clone()
    for offset, dim, block in kernel_blocks:
        sl = slice(offset, offset + dim)
        out[..., sl] = queries[..., sl] @ block.to(queries.dtype)  # [..., d_b] @ [d_b, d_b]
    return out
