"""A nightly reindex of a Parquet dataset reads only what changed: files whose size and ETag
(or time) are unchanged keep their keys without being read, a changed file is read and
hashed again, and the featurize stage opens only the files that hold examples to featurize.
And the relearn rule counts changes since the version the weights were learned on."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attribution_core.config import ReindexConfig
from attribution_core.data.storage import filesystem_for
from attribution_core.data.writers import SYNTH_SCHEMA, synthetic_rows, write_parquet_dataset
from attribution_core.index.plan import keys_digest
from attribution_core.index.store import IndexStore
from pipelines.index.job import IndexRequest, run_index
from pipelines.index.listing import list_tree
from pipelines.index.scan import scan_keys
from pipelines.reindex.job import changes_between, relearn_decision
from tests.pipelines.conftest import project

N, PER_FILE = 40, 8


def _write_file(uri: str, name: str, rows: list[dict]) -> None:
    fs, root = filesystem_for(uri)
    pq.write_table(pa.Table.from_pylist(rows, schema=SYNTH_SCHEMA), f"{root}/{name}", filesystem=fs)


def _sizes(uri: str) -> dict[str, int]:
    return {f.path: f.size for f in list_tree(uri)}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_reindex_reads_only_new_and_changed_files(where, tmp_path, s3_base, ray_cluster, model_dirs):
    root = str(tmp_path) if where == "local" else f"{s3_base}/incremental-reads"
    data, index = f"{root}/data", f"{root}/index"
    rows = list(synthetic_rows(N, seed=21, size=16))
    write_parquet_dataset(data, rows, SYNTH_SCHEMA, {"kind": "test"}, rows_per_file=PER_FILE)
    cfg = project()
    model = model_dirs["text"]
    first = run_index(cfg, IndexRequest(dataset=data, model=model, out=index))
    assert first["source_files"] == first["source_files_hashed"] == N // PER_FILE, first
    assert first["source_bytes_read"] == first["source_bytes"] == sum(
        s for p, s in _sizes(data).items() if p.endswith(".parquet"))

    # A new file: only it is read (to hash its rows, then to featurize them).
    added = [dict(r, example_id=f"added-{i}") for i, r in enumerate(synthetic_rows(3, seed=77, size=16))]
    _write_file(data, "part-zz-added.parquet", added)
    grown = run_index(cfg, IndexRequest(dataset=data, model=model, out=index))
    assert grown["featurized"] == 3 and grown["rows"] == N + 3
    assert first["actors"] == 2 and grown["actors"] == 1  # one batch to featurize: one actor, one model load
    assert (grown["source_files_unchanged"], grown["source_files_hashed"], grown["source_files_featurized"]) == (5, 1, 1)
    assert grown["source_bytes_read"] == _sizes(data)["part-zz-added.parquet"]

    # One existing file rewritten with one caption changed: that file is read, one row featurized.
    name = sorted(p for p in _sizes(data) if p.startswith("part-0"))[1]
    fs, path = filesystem_for(data)
    table = pq.read_table(f"{path}/{name}", filesystem=fs).to_pylist()
    table[0]["caption"] = table[0]["caption"] + " again"
    _write_file(data, name, table)
    changed = run_index(cfg, IndexRequest(dataset=data, model=model, out=index))
    assert changed["featurized"] == 1 and changed["source_files_hashed"] == 1
    assert changed["source_bytes_read"] == _sizes(data)[name]

    # A removed file: its rows leave, nothing is read.
    fs.delete_file(f"{path}/part-zz-added.parquet")
    shrunk = run_index(cfg, IndexRequest(dataset=data, model=model, out=index))
    assert shrunk["rows"] == N and shrunk["featurized"] == 0 and shrunk["source_bytes_read"] == 0

    # The keys kept file by file are the keys a full read finds.
    store = IndexStore(index)
    manifest = store.latest()
    spec_keys = scan_keys(_spec(manifest))
    assert manifest.dataset["keys_digest"] == keys_digest(spec_keys)
    assert sum(f["rows"] for f in manifest.dataset["files"]) == N
    if where == "s3":
        assert all(f.get("etag") for f in manifest.dataset["files"])


def _spec(manifest):
    from attribution_core.index.source import SourceSpec

    fields = {k: v for k, v in manifest.dataset.items() if k in SourceSpec.__dataclass_fields__}
    return SourceSpec(**{**fields, "keep_columns": tuple(fields.get("keep_columns", ()))})


def test_relearn_counts_every_change_since_the_weights_version(tmp_path, ray_cluster, model_dirs):
    data, index = str(tmp_path / "data"), str(tmp_path / "index")
    write_parquet_dataset(data, list(synthetic_rows(N, seed=22, size=16)), SYNTH_SCHEMA, {"kind": "test"},
                          rows_per_file=PER_FILE)
    cfg, model = project(), model_dirs["text"]
    store = IndexStore(index)
    run_index(cfg, IndexRequest(dataset=data, model=model, out=index))
    learned_on = store.latest()  # the version the serving weights were learned on
    versions = []
    for night in range(2):  # two nights, 3 new images each: 7.5 % of the rows per night
        new = [dict(r, example_id=f"night{night}-{i}") for i, r in enumerate(synthetic_rows(3, seed=30 + night, size=16))]
        _write_file(data, f"part-night{night}.parquet", new)
        run_index(cfg, IndexRequest(dataset=data, model=model, out=index))
        versions.append(store.latest())
    last_night = changes_between(store, versions[0], versions[1])
    since_weights = changes_between(store, learned_on, versions[1])
    assert last_night["rows_added"] == 3 and last_night["changed_fraction"] == pytest.approx(3 / 43, abs=1e-6)
    assert since_weights == {"since": learned_on.version, "rows_added": 6, "rows_changed": 0, "rows_removed": 0,
                             "changed_fraction": 0.15}
    rule = ReindexConfig(relearn="changed", relearn_fraction=0.1)
    assert not relearn_decision(rule, versions[1].version, learned_on.version, last_night["changed_fraction"])[0]
    learn, why = relearn_decision(rule, versions[1].version, learned_on.version, since_weights["changed_fraction"])
    assert learn and f"15.0% of the rows changed since {learned_on.version}" in why
