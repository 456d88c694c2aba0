"""Exact top-k over an in-memory index, fast enough to answer online.

The stored features are float16; scoring must be exact in float32 over those values (the
offline ``attribute`` reads them the same way). A plain float32 GEMM needs the index
widened to float32 (twice the bytes to stream per query) and torch's own float16 / bfloat16
CPU GEMMs for a handful of query rows are no faster. fbgemm's float16-weight linear keeps
the index packed in float16 (exactly the stored values) and multiplies by float32 queries
with float32 accumulation: the same numbers as the float32 scan, reading half the bytes.
At 10^5 rows x 5,312 coordinates on two CPU cores: ~40 ms for up to 5 query rows
against ~150 ms in float32 (``attribution bench serve`` measures it in place).

Where fbgemm is unavailable (non-x86 builds) or the index lives on a GPU, the scan is the
blockwise float32 ``streaming_topk``. Top-k among exactly tied scores is unspecified in
either path.
"""

from __future__ import annotations

import warnings

import torch

from attribution_core.errors import InputError
from attribution_core.index.scoring import merged_topk, streaming_topk

PACK_ROWS = 16384  # rows per packed matrix: bounds the float32 transient while packing
MAX_QUERY_ROWS = 8  # fbgemm's float16 kernel slows sharply past 8 query rows: chunk them
_BLOCK = 8192  # rows per block of the exact float32 fallback scan


def fbgemm_available() -> bool:
    """Whether this torch build has fbgemm's packed float16 linear (x86 CPUs)."""
    engines = torch.backends.quantized.supported_engines
    return "fbgemm" in engines or "x86" in engines


class SearchIndex:
    """Exact top-k of ``queries @ X^T`` for a fixed ``X`` (``Tensor[N, D]``, float16 or float32).

    On CPU with fbgemm and a float16 ``X``, the rows are packed once (about 4 s per 10^5
    rows of 5,312 coordinates) and the float16 copy is released: memory stays ~2 bytes per
    number. Otherwise ``X`` is kept on ``device`` and scanned blockwise in float32.
    Read-only after construction, so replicas may query it from several threads.
    """

    def __init__(self, features: torch.Tensor, device: str | torch.device = "cpu") -> None:
        if features.dim() != 2:
            raise InputError(f"features must be [rows, dim], got shape {tuple(features.shape)}")
        self.device = torch.device(device)
        self.n, self.d = features.shape
        self.packed: list[object] = []  # fbgemm packed float16 blocks of PACK_ROWS rows, in order
        self.exact: torch.Tensor | None = None
        if self.device.type == "cpu" and features.dtype == torch.float16 and fbgemm_available() and self.n:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fbgemm warns about values it would saturate; float16 input has none
                for start in range(0, self.n, PACK_ROWS):
                    block = features[start : start + PACK_ROWS].float().contiguous()
                    self.packed.append(torch.ops.quantized.linear_prepack_fp16(block, None))
        else:
            self.exact = features.to(self.device)

    @property
    def kernel(self) -> str:
        return "fbgemm-fp16" if self.packed else f"float32-scan-{self.device.type}"

    @property
    def bytes_per_row(self) -> int:
        """Bytes per row held in memory: float16 packed, or the rows as given."""
        return 2 * self.d if self.packed else self.exact.element_size() * self.d

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """All scores, ``Tensor[B, N]`` float32 (for tests and small indexes)."""
        queries = self._check(queries)
        if self.packed:
            return torch.cat([torch.ops.quantized.linear_dynamic_fp16(queries, p) for p in self.packed], dim=1)
        return (queries.to(self.device) @ self.exact.float().T).cpu()

    def topk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and row indices, ``Tensor[B, min(k, N)]`` each, best first, for ``Tensor[B, D]`` queries."""
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        queries = self._check(queries)
        if self.n == 0:
            empty = torch.empty(queries.shape[0], 0)
            return empty, empty.long()
        if not self.packed:
            blocks = (self.exact[i : i + _BLOCK] for i in range(0, self.n, _BLOCK))
            scores, rows = streaming_topk(queries.to(self.device), blocks, k)
            return scores.cpu(), rows.cpu()
        parts = [self._packed_topk(queries[i : i + MAX_QUERY_ROWS], k) for i in range(0, queries.shape[0], MAX_QUERY_ROWS)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _packed_topk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return merged_topk((torch.ops.quantized.linear_dynamic_fp16(queries, packed) for packed in self.packed), k)

    def _check(self, queries: torch.Tensor) -> torch.Tensor:
        if queries.dim() != 2 or queries.shape[1] != self.d:
            raise InputError(f"queries must be [batch, {self.d}], got shape {tuple(queries.shape)}")
        return queries.float().contiguous()
