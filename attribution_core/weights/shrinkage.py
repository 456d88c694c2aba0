"""Do no harm: how far learned weights move from uniform, chosen on held-out learning queries.

The learned ``w`` minimises the weight objective on its learning queries; on queries it did
not see, a point between uniform and ``w`` can be better. For each ``a`` in ``SHRINKAGE``
the objective of ``w_a = (1 - a) uniform + a w`` is measured on held-out learning queries
(generated like the learning ones, with seeds of their own -- never evaluation queries),
and the ``a`` of the lowest value is kept; on a tie, the smaller move.
"""

from __future__ import annotations

import torch

SHRINKAGE = (0.0, 0.25, 0.5, 0.75, 1.0)


def shrunk(weights: torch.Tensor, a: float) -> torch.Tensor:
    """``(1 - a) uniform + a weights`` for ``weights [M]``."""
    m = weights.shape[-1]
    return (1 - a) * torch.full_like(weights, 1.0 / m) + a * weights


def choose_shrinkage(objective: dict[float, float]) -> float:
    """The move of the lowest held-out objective; the smallest such move on a tie."""
    return min(sorted(objective), key=lambda a: objective[a])
