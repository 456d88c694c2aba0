"""Online search: exact top-k from packed float16 rows, shared preconditioning, partitions, merging."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attribution_core.config_serve import ServeConfig
from attribution_core.features.groups import GroupLayout, GroupSpec
from attribution_core.index.kernel import precondition
from attribution_core.index.manifest import Shard
from attribution_core.index.reader import partition_shards
from attribution_core.index.scoring import preconditioned_queries, topk_reference, weighted_queries
from attribution_core.index.search import PACK_ROWS, SearchIndex, fbgemm_available
from pipelines.serve.messages import PartitionAnswer
from pipelines.serve.protocol import RequestError, build_query, merge_partitions, parse_aspects, parse_k


def layout(dims=(24, 40, 16)) -> GroupLayout:
    groups, offset = [], 0
    for i, d in enumerate(dims):
        groups.append(GroupSpec(f"g{i}", offset, d, ()))
        offset += d
    return GroupLayout(groups=tuple(groups), layers=(), k_in=1, k_out=1)


@pytest.mark.parametrize("n", [10, PACK_ROWS + 123])
def test_search_index_equals_a_float32_scan_of_the_stored_float16_rows(n):
    gen = torch.Generator().manual_seed(n)
    rows = (torch.randn(n, 80, generator=gen) * 0.05).half()
    queries = torch.randn(11, 80, generator=gen)  # > 8 rows: the packed path chunks them
    index = SearchIndex(rows)
    assert index.kernel == ("fbgemm-fp16" if fbgemm_available() else "float32-scan-cpu")
    scores, idx = index.topk(queries, 7)
    ref_scores, ref_idx = topk_reference(queries @ rows.float().T, 7)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(index.scores(queries), queries @ rows.float().T, rtol=1e-5, atol=1e-6)
    # k beyond N returns every row
    assert index.topk(queries[:1], n + 5)[1].shape == (1, n)


def test_search_index_rejects_wrong_shapes():
    index = SearchIndex(torch.zeros(4, 6, dtype=torch.float16))
    with pytest.raises(Exception, match=r"queries must be \[batch, 6\]"):
        index.topk(torch.zeros(2, 5), 1)
    with pytest.raises(Exception, match="k must be >= 1"):
        index.topk(torch.zeros(2, 6), 0)


@pytest.mark.parametrize("kernel_kind", ["none", "block", "full"])
def test_preconditioning_all_weightings_at_once_equals_one_at_a_time(kernel_kind):
    lay = layout()
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, lay.k_total, generator=gen)
    w = torch.rand(4, len(lay.groups), generator=gen)

    def spd(d):
        a = torch.randn(d, d, generator=gen, dtype=torch.float64)
        return a @ a.T + d * torch.eye(d, dtype=torch.float64)

    kernel = {"none": None,
              "block": [(g.offset, g.dim, spd(g.dim)) for g in lay.groups],
              "full": [(0, lay.k_total, spd(lay.k_total))]}[kernel_kind]
    got = preconditioned_queries(q, w, lay, kernel)
    one_by_one = weighted_queries(q.double(), w.double(), lay)
    if kernel:
        one_by_one = precondition(one_by_one, kernel)
    torch.testing.assert_close(got, one_by_one.float(), rtol=1e-6, atol=1e-8)


def test_partitions_cover_every_shard_once_with_balanced_rows():
    shards = [Shard(f"s{i}", r, 0) for i, r in enumerate([64, 64, 64, 30, 12, 64, 5])]
    parts = partition_shards(shards, 3)
    assert sorted(s.path for p in parts for s in p) == sorted(s.path for s in shards)
    totals = [sum(s.rows for s in p) for p in parts]
    assert max(totals) - min(totals) <= 64
    assert partition_shards(shards, 3) == parts  # every searcher computes the same split


def test_merging_partition_top_k_equals_top_k_of_all_rows():
    gen = np.random.default_rng(0)
    scores = gen.normal(size=40)
    rows = [{"example_id": f"e{i}", "score": float(s), "uri": f"u{i}", "caption": ""} for i, s in enumerate(scores)]
    parts = [rows[:13], rows[13:30], rows[30:]]
    answers = [PartitionAnswer(key="v1-a", version="v1", held=("v1-a",), search_ms=1.0, batch=1,
                               resolved={"general": "general"},
                               results={"general": sorted(p, key=lambda r: -r["score"])[:5]}) for p in parts]
    merged = merge_partitions(answers, ("general",), 5)["general"]
    best = sorted(rows, key=lambda r: -r["score"])[:5]
    assert [m.example_id for m in merged] == [b["example_id"] for b in best]
    positive = [max(b["score"], 0) for b in best]
    assert [m.share for m in merged] == pytest.approx([p / sum(positive) for p in positive])
    assert [m.rank for m in merged] == [1, 2, 3, 4, 5] and all(m.metadata == {} for m in merged)


def test_request_checks_name_what_to_fix():
    cfg = ServeConfig(max_image_bytes=1000, max_k=20)
    with pytest.raises(RequestError, match="unknown aspect") as e:
        parse_aspects(["general", "colour"], cfg)
    assert e.value.status == 422
    assert parse_aspects(None, cfg) == ("general",) and parse_aspects("style, subject", cfg) == ("style", "subject")
    for bad in (0, 21, "x", 2.5):
        with pytest.raises(RequestError) as e:
            parse_k(bad, cfg)
        assert e.value.status == 422
    assert parse_k(None, cfg) == 10 and parse_k("3", cfg) == 3
    with pytest.raises(RequestError) as e:
        build_query(b"\x89PNG" + b"0" * 2000, None, None, None, k=None, cfg=cfg)
    assert e.value.status == 413
    with pytest.raises(RequestError) as e:
        build_query(b"not an image", None, None, None, k=None, cfg=cfg)
    assert e.value.status == 400 and "PNG or JPEG" in e.value.detail
