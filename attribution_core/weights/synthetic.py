"""Synthetic per-group features with a known answer, for tests and benchmarks.

Index rows are standard normal, generated in fixed blocks of ``BLOCK`` rows from
``(seed, block number)``, so any block can be regenerated alone (scans over N = 10^6 never
hold the index). Each learning query copies, in the ``signal`` groups, the features of one
training example (its "source") plus a little noise; in the other groups it is unrelated
noise of a larger scale. Weights that attribute well put their mass on the signal groups.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from attribution_core.features.groups import GroupLayout, GroupSpec
from attribution_core.seeding import stable_seed

BLOCK = 4096


def synthetic_layout(groups: int, dim: int) -> GroupLayout:
    specs = tuple(GroupSpec(f"group{j}", j * dim, dim, (f"layer{j}",)) for j in range(groups))
    return GroupLayout(groups=specs, layers=(), k_in=dim, k_out=1)


def index_block(seed: int, number: int, n: int, k_total: int) -> torch.Tensor:
    """Rows ``[number * BLOCK, min(n, (number + 1) * BLOCK))`` of the index, ``[b, k_total]``."""
    rows = min(BLOCK, n - number * BLOCK)
    g = torch.Generator().manual_seed(stable_seed("synthetic-index", seed, number))
    return torch.randn(rows, k_total, generator=g)


def index_blocks(n: int, k_total: int, seed: int, *, first: int = 0, last: int | None = None
                 ) -> Iterator[tuple[list[str], torch.Tensor]]:
    """``(row ids, rows)`` of blocks ``first .. last - 1`` (default: all)."""
    last = (n + BLOCK - 1) // BLOCK if last is None else last
    for b in range(first, last):
        rows = index_block(seed, b, n, k_total)
        yield [str(b * BLOCK + i) for i in range(rows.shape[0])], rows


def synthetic_queries(n: int, queries: int, layout: GroupLayout, signal: tuple[int, ...], *, seed: int = 0,
                      noise_scale: float = 3.0, copy_noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries ``[Q, k_total]``, source row of each ``[Q]``; sources among the first 16 blocks)."""
    g = torch.Generator().manual_seed(stable_seed("synthetic-queries", seed))
    sources = torch.randint(0, min(n, 16 * BLOCK), (queries,), generator=g)
    q = noise_scale * torch.randn(queries, layout.k_total, generator=g)
    blocks = {int(b): index_block(seed, int(b), n, layout.k_total) for b in torch.unique(sources // BLOCK)}
    src = torch.stack([blocks[int(s) // BLOCK][int(s) % BLOCK] for s in sources])
    for j in signal:
        spec = layout.groups[j]
        sl = slice(spec.offset, spec.offset + spec.dim)
        q[:, sl] = src[:, sl] + copy_noise * torch.randn(queries, spec.dim, generator=g)
    return q, sources


def synthetic_index(n: int, layout: GroupLayout, seed: int = 0) -> torch.Tensor:
    """The whole index ``[N, k_total]`` (small N)."""
    return torch.cat([rows for _, rows in index_blocks(n, layout.k_total, seed)])
