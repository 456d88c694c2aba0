"""Approximate search: candidates from 4-bit product codes (FAISS fast-scan), then exact
scores from the stored rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution_core.errors import ConfigError, InputError
from attribution_core.index.approximate import (MIN_SLICE_ROWS, AnnSettings, ApproximateIndex, RescoredSearch, Whitening,
                                                default_settings, padded_dim)
from attribution_core.index.search import SearchIndex


def clustered_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Rows around 64 directions, float16 as an index stores them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    rows = centres[rng.integers(0, 64, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return rows.astype(np.float16)


@pytest.fixture(scope="module")
def built():
    rows = clustered_rows(12_000, 61)  # 61: not a multiple of 8, so the rows are padded
    settings = default_settings(*rows.shape)
    index = ApproximateIndex.build(rows, settings)
    return rows, index, index.to_bytes()  # serialised before any search


def test_default_settings_follow_the_rows():
    assert default_settings(1_000_000, 5312).code_bytes == 664  # 1/16 of the float16 row
    assert padded_dim(61) == 64 and default_settings(100_000, 61).code_bytes == 8


def test_returned_scores_are_exact_and_recall_is_high(built):
    rows, index, _ = built
    queries = torch.from_numpy(clustered_rows(40, 61, seed=1).astype(np.float32))
    exact_scores, exact_rows = SearchIndex(torch.from_numpy(rows)).topk(queries, 10)
    scores, found = index.topk(queries, 10, lambda numbers: rows[numbers])
    stored = torch.from_numpy(rows.astype(np.float32))
    for i in range(len(queries)):  # every returned score is the row's exact score, best first
        torch.testing.assert_close(scores[i], stored[found[i]] @ queries[i], rtol=1e-5, atol=1e-4)
        assert torch.all(scores[i][:-1] >= scores[i][1:])
    recall = np.mean([len(set(found[i].tolist()) & set(exact_rows[i].tolist())) / 10 for i in range(len(queries))])
    # Toy clusters: each query's top 10 among ~190 rows of its cluster that differ by noise
    # only (recall@10 1.0 on rows synthesised from the demo index; the search benchmark).
    assert recall >= 0.95, recall
    assert index.bytes_per_row == 8 and index.rows == len(rows)  # 64 coordinates -> 8 code bytes


def test_fewer_candidates_lose_recall_but_stay_exact(built):
    rows, index, data = built
    queries = torch.from_numpy(clustered_rows(40, 61, seed=2).astype(np.float32))
    narrow = ApproximateIndex.from_bytes(data, 61, AnnSettings(**{**index.settings.__dict__, "candidates": 10}))
    _, exact_rows = SearchIndex(torch.from_numpy(rows)).topk(queries, 10)
    scores, found = narrow.topk(queries, 10, lambda numbers: rows[numbers])
    stored = torch.from_numpy(rows.astype(np.float32))
    valid = found >= 0
    expected = torch.stack([stored[found[i, c]] @ queries[i] for i, c in valid.nonzero().tolist()])
    torch.testing.assert_close(scores[valid], expected, rtol=1e-5, atol=1e-4)
    narrow_recall = np.mean([len(set(found[i].tolist()) & set(exact_rows[i].tolist())) / 10
                             for i in range(len(queries))])
    _, wide = index.topk(queries, 10, lambda numbers: rows[numbers])  # 1,000 candidates
    wide_recall = np.mean([len(set(wide[i].tolist()) & set(exact_rows[i].tolist())) / 10 for i in range(len(queries))])
    assert narrow_recall < wide_recall


def test_serialised_index_and_codes_made_elsewhere_answer_the_same(built):
    rows, index, data = built
    queries = clustered_rows(8, 61, seed=3).astype(np.float32)
    again = ApproximateIndex.from_bytes(data, 61, index.settings)
    np.testing.assert_array_equal(again.candidates(queries), index.candidates(queries))
    trained = ApproximateIndex.train(rows[:4000], 61, index.settings)
    recoded = ApproximateIndex.from_bytes(trained.to_bytes(), 61, index.settings)
    for start in range(0, len(rows), 5000):  # as the index job's tasks code shards and a searcher adds them
        recoded.add_codes(trained.encode(rows[start : start + 5000]))
    direct = ApproximateIndex.train(rows[:4000], 61, index.settings)
    direct.add(rows)
    np.testing.assert_array_equal(recoded.candidates(queries), direct.candidates(queries))
    with pytest.raises(InputError, match="stored approximate index has 64 coordinates"):
        ApproximateIndex.from_bytes(data, 80, index.settings)
    with pytest.raises(InputError, match="before its first search"):
        index.to_bytes()


def test_a_scan_split_over_threads_answers_as_one_slice():
    # Gaussian rows and one coordinate per sub-quantiser: candidates' code scores do not tie,
    # so the slices' merged candidates are the single scan's
    rows = np.random.default_rng(0).standard_normal((3 * MIN_SLICE_ROWS + 5, 16)).astype(np.float16)
    settings = AnnSettings(code_bytes=8, candidates=200)
    trained = ApproximateIndex.build(rows, settings).to_bytes()
    one, three = (RescoredSearch(ApproximateIndex.from_bytes(trained, 16, settings), torch.from_numpy(rows), threads)
                  for threads in (1, 3))
    assert type(one.index._scan).__name__ == "IndexPQFastScan" and three.index._scan.count() == 3
    assert one.index.rows == three.index.rows == len(rows)
    queries = torch.from_numpy(np.random.default_rng(1).standard_normal((12, 16)).astype(np.float32))
    (s1, r1), (s3, r3) = one.topk(queries, 10), three.topk(queries, 10)
    torch.testing.assert_close(s3, s1)
    assert torch.equal(r3, r1) and int(r3.max()) >= 2 * MIN_SLICE_ROWS  # row numbers run on across slices
    few = RescoredSearch(ApproximateIndex.build(rows[:1000], AnnSettings(code_bytes=2)), torch.from_numpy(rows[:1000]), 4)
    assert type(few.index._scan).__name__ == "IndexPQFastScan"  # too few rows to split


def test_whitening_keeps_every_inner_product():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    kernel = [(1, 6, a @ a.T + torch.eye(6, dtype=torch.float64))]  # one block; coordinates 0 and 7.. untouched
    whitening = Whitening.from_kernel(kernel)
    again = Whitening.from_bytes(whitening.to_bytes())
    rows, queries = torch.randn(5, 10, generator=gen).numpy(), torch.randn(3, 10, generator=gen).numpy()
    np.testing.assert_allclose(again.queries(queries) @ again.rows(rows).T, queries @ rows.T, rtol=1e-4, atol=1e-4)
    assert not np.allclose(again.rows(rows), rows) and Whitening.from_kernel([]) is None


def test_bad_input_says_what_to_change(built):
    rows, index, _ = built
    with pytest.raises(InputError, match=r"queries must be \[batch, 61\]"):
        index.candidates(np.zeros((2, 60), np.float32))
    with pytest.raises(InputError, match="k must be >= 1"):
        index.topk(torch.zeros(1, 61), 0, lambda numbers: rows[numbers])
    with pytest.raises(InputError, match="too few to train"):
        ApproximateIndex.build(rows[:10], AnnSettings(code_bytes=8))
    with pytest.raises(ConfigError, match="must divide half the padded dimension 32"):
        ApproximateIndex.build(rows, AnnSettings(code_bytes=7))
