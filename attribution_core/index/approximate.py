"""Approximate maximum-inner-product search over an index's stored rows, rescored exactly.

Weights and the kernel change only the query (``q' = K (w * g(q))``), never the stored rows,
so one index over the rows serves every aspect and every weighting. Each row is held as a
product code of ``code_bytes`` bytes: ``2 * code_bytes`` sub-vectors of the (whitened,
``Whitening``) row, each coded by 4 bits (16 centroids), which FAISS's fast-scan kernels
compare with a query 32 rows at a time in SIMD registers. The scan proposes ``candidates``
rows per query; each is then scored exactly against its stored row, in float32 over the
stored values as the exact scan does, so every returned score is exact and only recall
(whether a true top-k row was proposed) is approximate.

The layout was chosen by measurement (4-bit fast-scan codes over every row against 8-bit
IVF-PQ codes and inverted lists, inner product against the L2 reduction); the numbers are in
``benchmarks/README.md`` ("Approximate search: how the layout was chosen"), and
``attribution bench search`` measures recall and latency on an index's own rows.

Rows are padded with zeros to a multiple of ``DIM_PER_BYTE`` coordinates, which leaves every
inner product unchanged.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable

import numpy as np
import torch

from attribution_core.errors import ConfigError, InputError

DIM_PER_BYTE = 8  # coordinates per code byte: two 4-bit sub-quantiser codes of 4 coordinates each
CODE_BITS = 4  # bits per sub-quantiser code: what FAISS's fast-scan kernels take
MIN_TRAIN_ROWS = 2**CODE_BITS  # one per centroid; FAISS warns under 39 per centroid, recall is the test
MAX_TRAIN_ROWS = 65_536  # rows sampled to train the quantisers (training time grows with it, recall hardly)
ADD_ROWS = 16_384  # rows coded at a time: bounds the float32 copy
MIN_SLICE_ROWS = 32_768  # fewer rows per slice are scanned faster by one thread than split
# torch threads of a process that searches approximately. The slices of a query's scan run on
# threads of their own (``prepare``), and torch's OpenMP threads keep spinning after a product,
# taking the cores the slices scan on; rescoring 1,000 candidates takes a few ms on one
# (benchmarks/README.md, "Thread settings").
RESCORING_THREADS = 1

RowReader = Callable[[np.ndarray], torch.Tensor]  # row numbers -> the stored rows, [len, D]


@dataclasses.dataclass(frozen=True)
class AnnSettings:
    """The approximate index's parameters (recorded with the version they index)."""

    code_bytes: int
    """Bytes of each row's product code (two 4-bit sub-quantisers per byte)."""
    candidates: int = 1000
    """Rows proposed per query and then rescored exactly (at least the k asked for)."""
    seed: int = 0
    """Seed of the training sample and of the k-means."""

    @property
    def code_width(self) -> int:
        """Bytes of one row's code: ``2 * code_bytes`` sub-quantiser codes of ``CODE_BITS`` bits."""
        return 2 * self.code_bytes * CODE_BITS // 8

    def check(self, dim: int) -> None:
        if min(self.code_bytes, self.candidates) < 1:
            raise ConfigError(f"approximate search settings must be positive, got {self}")
        if padded_dim(dim) % (2 * self.code_bytes):
            raise ConfigError(f"code_bytes {self.code_bytes} must divide half the padded dimension "
                              f"{padded_dim(dim) // 2} (the coordinates rounded up to a multiple of {DIM_PER_BYTE})")


def set_threads(threads: int) -> None:
    """Threads of FAISS's scans (process-wide). Keep it at torch's count for the searcher:
    FAISS and torch each bring an OpenMP runtime whose idle threads spin after a parallel
    region, so two of them on few cores slow each other (benchmarks/README.md, "Thread
    settings")."""
    import faiss

    faiss.omp_set_num_threads(max(1, threads))


def padded_dim(dim: int) -> int:
    return -(-dim // DIM_PER_BYTE) * DIM_PER_BYTE


def default_settings(rows: int, dim: int, seed: int = 0) -> AnnSettings:
    """Settings for ``rows`` rows of ``dim`` coordinates: one code byte per ``DIM_PER_BYTE``
    coordinates (1/16 of a float16 row)."""
    if rows < 1 or dim < 1:
        raise InputError(f"an approximate index needs rows and coordinates, got {rows} x {dim}")
    return AnnSettings(code_bytes=padded_dim(dim) // DIM_PER_BYTE, seed=seed)


def training_sample(rows: np.ndarray, seed: int, limit: int = MAX_TRAIN_ROWS) -> np.ndarray:
    """At most ``limit`` of ``rows``, a seeded sample in row order."""
    if rows.shape[0] <= limit:
        return rows
    return rows[np.sort(np.random.default_rng(seed).choice(rows.shape[0], limit, replace=False))]


def _padded(rows: np.ndarray, dim: int) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.shape[1] == dim:
        return rows
    return np.ascontiguousarray(np.pad(rows, ((0, 0), (0, dim - rows.shape[1]))))


class Whitening:
    """The space the approximate index codes in: rows ``K^(1/2) x`` and queries ``K^(-1/2) q``
    for the version's kernel ``K`` (per block; other coordinates as they are). Inner products
    are unchanged, ``(K^(-1/2) q)^T (K^(1/2) x) = q^T x``, but the queries the endpoint sends
    (``q = K (w * g)``) weigh the rows' low-variance directions most, where quantising the
    rows as stored loses the ranking; in this space both sides are balanced. Measured on
    20,000 demo-distribution rows (8-bit product codes, every row scanned): recall@10 0.98
    with 4,000 candidates as stored, 1.0 with 1,000 whitened."""

    def __init__(self, blocks: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        self.blocks = blocks  # (offset, K^(1/2), K^(-1/2)) float32

    @classmethod
    def from_kernel(cls, kernel: list[tuple[int, int, torch.Tensor]]) -> Whitening | None:
        """From ``(offset, dim, K_b)`` blocks (``read_kernel``); None without a kernel."""
        if not kernel:
            return None
        blocks = []
        for offset, _, block in kernel:
            values, vectors = torch.linalg.eigh(block.double())
            root = values.clamp_min(values.max() * 1e-12).sqrt()
            blocks.append((offset, (vectors * root) @ vectors.T, (vectors / root) @ vectors.T))
        return cls([(o, r.float().numpy(), q.float().numpy()) for o, r, q in blocks])

    def rows(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, 1)

    def queries(self, q: np.ndarray) -> np.ndarray:
        return self._apply(q, 2)

    def _apply(self, x: np.ndarray, which: int) -> np.ndarray:
        out = np.array(x, dtype=np.float32)
        for block in self.blocks:
            offset, matrix = block[0], block[which]
            out[:, offset : offset + len(matrix)] = out[:, offset : offset + len(matrix)] @ matrix  # symmetric
        return out

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, offsets=np.array([b[0] for b in self.blocks]),
                 **{f"rows{i}": b[1] for i, b in enumerate(self.blocks)},
                 **{f"queries{i}": b[2] for i, b in enumerate(self.blocks)})
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Whitening:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return cls([(int(o), f[f"rows{i}"], f[f"queries{i}"]) for i, o in enumerate(f["offsets"])])


class ApproximateIndex:
    """Candidate rows for inner-product queries (``candidates``), and the exact top-k among
    them (``topk``, given the stored rows). Rows are added as codes (``add``, or ``encode``
    then ``add_codes`` in other processes); the first search packs them for the fast-scan
    kernels. Read-only once searched, so replicas may query it from several threads."""

    def __init__(self, index, dim: int, settings: AnnSettings, whitening: Whitening | None = None) -> None:
        self.index = index  # faiss.IndexPQ: trained quantisers and the codes added so far
        self.dim = dim
        self.settings = settings
        self.whitening = whitening
        self._scan = None  # faiss.IndexPQFastScan of the codes (IndexShards of slices), made at the first search
        self._slices: list = []  # the slices' scanners, which the IndexShards refers to

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        rows = self.whitening.rows(rows) if self.whitening else rows
        return _padded(rows, padded_dim(self.dim))

    @classmethod
    def train(cls, sample: np.ndarray, dim: int, settings: AnnSettings,
              whitening: Whitening | None = None) -> ApproximateIndex:
        """An empty index whose quantisers are trained on ``sample`` (``[n, dim]`` rows, a
        seeded sample of what it will hold): rows are added later, by ``add`` or as codes
        ``encode`` made with the same trained index (``add_codes``)."""
        import faiss

        settings.check(dim)
        if sample.ndim != 2 or sample.shape[1] != dim:
            raise InputError(f"the training sample must be [rows, {dim}], got shape {sample.shape}")
        if sample.shape[0] < MIN_TRAIN_ROWS:
            raise InputError(f"{sample.shape[0]} rows are too few to train {2**CODE_BITS} codes per sub-quantiser; "
                             "search them exactly")
        pdim = padded_dim(dim)
        index = faiss.IndexPQ(pdim, 2 * settings.code_bytes, CODE_BITS, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed = settings.seed
        out = cls(index, dim, settings, whitening)
        index.train(out._rows(sample))
        return out

    @classmethod
    def build(cls, rows: np.ndarray, settings: AnnSettings | None = None,
              whitening: Whitening | None = None) -> ApproximateIndex:
        """Train the quantisers on a seeded sample of ``rows`` (``[N, D]``, float16 or float32)
        and code every row, in order: candidate numbers are row numbers."""
        if rows.ndim != 2 or rows.shape[0] < 1:
            raise InputError(f"rows must be a non-empty [rows, dim] matrix, got shape {rows.shape}")
        n, dim = rows.shape
        settings = settings or default_settings(n, dim)
        out = cls.train(training_sample(rows, settings.seed), dim, settings, whitening)
        for start in range(0, n, ADD_ROWS):
            out.add(rows[start : start + ADD_ROWS])
        return out

    def add(self, rows: np.ndarray) -> None:
        """Code ``rows`` and append them (numbered on from ``self.rows``)."""
        self.add_codes(self.encode(rows))

    def encode(self, rows: np.ndarray) -> np.ndarray:
        """``[n, code_width]`` uint8: each row's product code, which ``add_codes`` of any copy
        of this trained index appends without the rows."""
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise InputError(f"rows must be [rows, {self.dim}], got shape {rows.shape}")
        return self.index.sa_encode(self._rows(rows))

    def add_codes(self, codes: np.ndarray) -> None:
        """Append rows by their ``encode`` codes, numbered on from ``self.rows``."""
        if codes.ndim != 2 or codes.shape[1] != self.code_width:
            raise InputError(f"codes must be [rows, {self.code_width}] bytes, got shape {codes.shape}")
        if self._scan is not None:
            raise InputError("add rows to an approximate index before its first search (its codes are then packed "
                             "for scanning)")
        self.index.add_sa_codes(np.ascontiguousarray(codes, dtype=np.uint8))

    @property
    def code_width(self) -> int:
        """Bytes of one row's code."""
        return int(self.index.sa_code_size())

    @property
    def rows(self) -> int:
        return int((self._scan if self._scan is not None else self.index).ntotal)

    @property
    def bytes_per_row(self) -> int:
        """Bytes held per row: its code (row numbers are positions, not stored)."""
        return self.code_width

    def prepare(self, slices: int = 1) -> None:
        """Pack the codes for scanning (done by the first search otherwise, in one slice).
        With ``slices`` > 1 the rows are split into that many slices, each scanned by its own
        thread, so that one query uses as many cores (FAISS spreads only the queries of a call
        over its threads)."""
        self._scanner(slices)

    def _scanner(self, slices: int = 1):
        import faiss

        if self._scan is not None:
            return self._scan
        n = self.index.ntotal
        slices = max(1, min(slices, n // MIN_SLICE_ROWS))
        if slices == 1:
            self._scan = faiss.IndexPQFastScan(self.index)
        else:  # each slice packed from a view of the codes, then the codes freed: one copy at a time
            width = self.code_width
            codes = faiss.rev_swig_ptr(self.index.codes.data(), n * width).reshape(n, width)
            shards = faiss.IndexShards(self.index.d, True, True)  # threaded, successive row numbers
            bounds = np.linspace(0, n, slices + 1).astype(int)
            empty = faiss.IndexPQ(self.index.d, self.index.pq.M, self.index.pq.nbits, self.index.metric_type)
            empty.pq = self.index.pq  # the trained quantisers (copied)
            empty.is_trained = True
            for start, stop in zip(bounds[:-1], bounds[1:]):
                part = faiss.clone_index(empty)
                part.add_sa_codes(np.ascontiguousarray(codes[start:stop]))
                self._slices.append(faiss.IndexPQFastScan(part))
                shards.add_shard(self._slices[-1])  # not owned: Python holds the slices
            self._scan = shards
        self.index.reset()  # the codes now live packed in the scanner; keep one copy
        return self._scan

    def candidates(self, queries: torch.Tensor | np.ndarray, count: int | None = None) -> np.ndarray:
        """``[B, count]`` row numbers proposed for each query (``-1`` where fewer rows exist)."""
        q = np.asarray(queries.detach().cpu() if isinstance(queries, torch.Tensor) else queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(f"queries must be [batch, {self.dim}], got shape {tuple(q.shape)}")
        q = self.whitening.queries(q) if self.whitening else q
        _, found = self._scanner().search(_padded(q, padded_dim(self.dim)), count or self.settings.candidates)
        return found

    def topk(self, queries: torch.Tensor, k: int, read_rows: RowReader) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact scores and row numbers of the best ``k`` proposed rows, ``Tensor[B, k']`` each,
        best first (``k' = min(k, rows)``); ``read_rows`` returns the stored rows by number.

        The rows proposed for any query of the call are read once and scored exactly against
        every query of the call (the aspects of one request share most candidates: 2,169
        distinct rows for 5 x 1,000 at 10^5 rows); a query thus ranks its own candidates and
        perhaps a few more, which only adds recall."""
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        k = min(k, self.rows)
        if k == 0:
            return torch.empty(queries.shape[0], 0), torch.empty(queries.shape[0], 0, dtype=torch.long)
        found = self.candidates(queries, max(k, self.settings.candidates))
        proposed = np.unique(found[found >= 0])  # sorted: rows read from a file are read in order
        exact = queries.float() @ torch.as_tensor(read_rows(proposed)).float().T  # [B, proposed]
        best = torch.topk(exact, min(k, len(proposed)), dim=1)
        scores, numbers = best.values, torch.from_numpy(proposed)[best.indices]
        if len(proposed) < k:  # fewer proposed than asked: mark the rest empty
            pad = k - len(proposed)
            scores = torch.cat([scores, torch.full((len(queries), pad), float("-inf"))], dim=1)
            numbers = torch.cat([numbers, torch.full((len(queries), pad), -1, dtype=torch.long)], dim=1)
        return scores, numbers

    def to_bytes(self) -> bytes:
        """The trained quantisers and the codes added (FAISS's format)."""
        import faiss

        if self._scan is not None:
            raise InputError("serialise an approximate index before its first search (its codes are then packed "
                             "for scanning)")
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, dim: int, settings: AnnSettings,
                   whitening: Whitening | None = None) -> ApproximateIndex:
        import faiss

        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if index.d != padded_dim(dim) or index.code_size != settings.code_bytes:
            raise InputError(f"the stored approximate index has {index.d} coordinates and {index.code_size}-byte codes; "
                             f"its settings say {padded_dim(dim)} and {settings.code_bytes}")
        return cls(index, dim, settings, whitening)


class RescoredSearch:
    """Exact-scored top-k like ``SearchIndex``, from an ``ApproximateIndex``'s candidates and
    the stored rows (``[N, D]``, in memory or mapped from a file: only candidates are read)."""

    def __init__(self, index: ApproximateIndex, rows: torch.Tensor, threads: int = 1) -> None:
        """``threads``: cores one query's scan is spread over (``ApproximateIndex.prepare``)."""
        if index.rows != rows.shape[0] or index.dim != rows.shape[1]:
            raise InputError(f"the approximate index holds {index.rows} rows of {index.dim}; "
                             f"the stored rows are {tuple(rows.shape)}")
        self.index = index
        self.stored = rows
        self.n, self.d = rows.shape
        index.prepare(threads)

    @property
    def kernel(self) -> str:
        s = self.index.settings
        return f"pq{s.code_bytes}B-fastscan{'-whitened' if self.index.whitening else ''}-rescore{s.candidates}"

    @property
    def bytes_per_row(self) -> int:
        """Bytes per row held in memory (the rows themselves stay in their file)."""
        return self.index.bytes_per_row

    def _read(self, numbers: np.ndarray) -> torch.Tensor:
        """The stored rows ``numbers`` (sorted). ``np.take`` gathers rows of a mapped file about
        2.6x faster than torch's indexing (1,000 of 10^5 rows x 5,312 float16: 1.6 against
        4.2 ms), a quarter of a one-aspect query's time at 10^5 rows."""
        if isinstance(self.stored, torch.Tensor):
            return torch.from_numpy(np.take(self.stored.numpy(), numbers, axis=0))
        return self.stored[torch.from_numpy(numbers)]

    def topk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.index.topk(queries.float(), k, self._read)
