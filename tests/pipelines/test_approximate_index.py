"""The approximate search index the index job builds with a version, as searchers and
``attribution bench search`` use it (on the shared index of ``full_build``)."""

from __future__ import annotations

import shutil

import pytest
import torch

from attribution_core.data.writers import synthetic_rows
from attribution_core.errors import ConfigError
from attribution_core.weights.served import ServedIndex
from attribution_core.index.store import IndexStore
from pipelines.index.job import IndexRequest, run_index
from tests.pipelines.conftest import N, project, write_rows


def _same_answers(out: str, parts: int) -> None:
    """The approximate searcher over every partition answers as the exact one: each index here
    has fewer rows than candidates, so every row is rescored."""
    gen = torch.Generator().manual_seed(3)
    for part in range(parts):
        exact = ServedIndex.load(out, part=part, parts=parts, search="exact")
        approx = ServedIndex.load(out, part=part, parts=parts, search="approximate")
        assert approx.search_mode == "approximate" and exact.search_mode == "exact"
        assert approx.example_ids == exact.example_ids
        queries = torch.randn(5, exact.layout.k_total, generator=gen)
        want, want_rows = exact.search_index.topk(queries, 7)
        got, got_rows = approx.search_index.topk(queries, 7)
        assert torch.equal(got_rows, want_rows)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_approximate_index_codes_every_row_and_an_update_codes_only_its_new_shards(full_build, tmp_path, model_dirs,
                                                                                  good_rows):
    out = str(tmp_path / "index")
    shutil.copytree(full_build["out"], out)
    with pytest.raises(ConfigError, match="has no approximate index"):
        ServedIndex.load(out, search="approximate")
    always = project(index={"approximate": {"build": "always"}})
    built = run_index(always, IndexRequest(dataset=full_build["data"], model=model_dirs["text"], out=out))
    manifest = IndexStore(out).latest()
    entry = manifest.approximate
    assert built["featurized"] == 0 and entry["reused_from"] is None
    assert sorted(p for b in entry["blocks"] for p in b["shards"]) == sorted(s.path for s in manifest.shards)
    assert sum(b["rows"] for b in entry["blocks"]) == manifest.rows == N
    assert entry["bytes_per_row"] == entry["settings"]["code_bytes"] == entry["padded_dim"] // 8
    for parts in (1, 2):
        _same_answers(out, parts)
    narrow = ServedIndex.load(out, search="approximate", candidates=3)
    queries = torch.randn(2, narrow.layout.k_total, generator=torch.Generator().manual_seed(4))
    scores, rows = narrow.search_index.topk(queries, 3)  # only 3 rows rescored: exact scores, maybe other rows
    exact = ServedIndex.load(out, search="exact").search_index.scores(queries)
    torch.testing.assert_close(scores, exact.gather(1, rows), rtol=1e-5, atol=1e-5)

    # 3 examples removed, 4 added: the trained index and the untouched shards' codes are kept.
    rows2 = good_rows[3:] + [dict(r, example_id=f"new-{i}") for i, r in enumerate(synthetic_rows(4, seed=9, size=16))]
    data = write_rows(str(tmp_path / "data-v2"), rows2)
    run_index(always, IndexRequest(dataset=data, model=model_dirs["text"], out=out))
    updated = IndexStore(out).latest().approximate
    assert updated["reused_from"] == manifest.version and updated["trained"] == entry["trained"]
    new_blocks = [b for b in updated["blocks"] if b not in entry["blocks"]]
    assert new_blocks and all(p.startswith(f"versions/{IndexStore(out).latest().version}/")
                              for b in new_blocks for p in b["shards"])
    _same_answers(out, 2)
    assert run_index(always, IndexRequest(dataset=data, model=model_dirs["text"], out=out))["up_to_date"]


def test_bench_search_reports_both_tiers(full_build, tmp_path):
    """``attribution bench search`` on rows drawn from this index: with fewer rows than
    candidates every row is rescored, so recall must be 1.0; the simulated run repeats codes."""
    from pipelines.bench.search import run

    report = run(full_build["out"], [200], simulate=500, queries=3, k=5, seed=0, work=tmp_path)
    real, simulated = report["results"]
    assert real["rows"] == 200 and simulated["rows"] == 500 and simulated["approximate"]["recall"] is None
    assert real["exact"]["bytes_per_row"] == report["float16_bytes_per_row"] == 2 * report["dim"]
    assert real["approximate"]["bytes_per_row"] == simulated["approximate"]["bytes_per_row"] < report["dim"] / 4
    assert all(r == {"mean": 1.0, "min": 1.0} for r in real["approximate"]["recall"].values())
    assert set(real["approximate"]["recall"]) == set(report["aspects"]) == {"uniform"}  # no learned weights here
    for tier in (real["exact"], real["approximate"], simulated["approximate"]):
        assert 0 < tier["p50_ms"] <= tier["p99_ms"] and 0 < tier["one_aspect"]["p50_ms"]
