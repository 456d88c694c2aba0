"""What users bring, checked without Ray: dataset layouts, label spellings, the columns a
model's recipe names, quarantine summaries, empty versions and renamed settings."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attribution_core.config import IndexConfig, ProjectConfig, TrainConfig, from_mapping, to_mapping
from attribution_core.data.images import encode_png
from attribution_core.data.loading import class_names, load_dataset
from attribution_core.data.readers import dataset_present, detect_layout, label_text, list_class_folder, read_examples
from attribution_core.errors import ConfigError, InputError, ManifestMismatchError
from attribution_core.index.manifest import IndexManifest, ModelRecord, Quarantine
from attribution_core.index.opening import EmptyIndexError, open_version
from attribution_core.index.quarantine import QuarantineError, check_quarantine, quarantine_summary
from attribution_core.index.store import IndexStore
from attribution_core.models.recipe import resolve_columns


def _png(value: int) -> bytes:
    return encode_png(np.full((8, 8, 3), value, dtype=np.uint8))


def test_class_folders_are_a_layout_with_labels_from_folder_names(tmp_path):
    root = tmp_path / "train"
    for cls, n in (("cat", 2), ("dog", 1)):
        (root / cls / "nested").mkdir(parents=True)
        for i in range(n):
            (root / cls / f"{i}.png").write_bytes(_png(10 * i))
    (root / "dog" / "nested" / "deep.jpg").write_bytes(_png(99))
    (root / "dog" / ".hidden.png").write_bytes(_png(1))
    (root / "dog" / "notes.txt").write_text("not an image")
    assert detect_layout(str(root)) == "classfolder"
    assert list_class_folder(str(root)) == [("cat/0.png", "cat"), ("cat/1.png", "cat"), ("dog/0.png", "dog"),
                                            ("dog/nested/deep.jpg", "dog")]
    examples = list(read_examples(str(root)))
    assert [e.attributes for e in examples] == [{"label": "cat"}] * 2 + [{"label": "dog"}] * 2
    assert examples[0].uri == f"{root}/cat/0.png" and examples[0].image == _png(0)
    data = load_dataset(str(root), 8, 3, conditioning="class")  # label column found by name
    assert data.label_names == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1, 1]
    assert data.columns == {"caption": None, "label": "label"}
    with pytest.raises(InputError, match="class-folder dataset, which has no caption column 'text'"):
        list(read_examples(str(root), "text"))


def test_a_flat_image_folder_is_unlabelled_and_an_empty_one_is_refused(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(_png(3))
    assert detect_layout(str(tmp_path / "flat")) == "classfolder"
    assert [e.attributes for e in read_examples(str(tmp_path / "flat"))] == [{}]
    (tmp_path / "empty").mkdir()
    assert not dataset_present(str(tmp_path / "empty")) and not dataset_present(str(tmp_path / "absent"))
    assert dataset_present(str(tmp_path / "flat"))
    with pytest.raises(InputError, match="holds no .parquet files, no metadata.jsonl and no images"):
        detect_layout(str(tmp_path / "empty"))


def test_partitioned_parquet_is_still_parquet(tmp_path):
    (tmp_path / "d" / "year=2024").mkdir(parents=True)
    pq.write_table(pa.table({"image": [_png(1)]}), tmp_path / "d" / "year=2024" / "part-0.parquet")
    assert detect_layout(str(tmp_path / "d")) == "parquet"


def test_integer_labels_keep_their_values_as_class_indices():
    assert [label_text(v) for v in (3, 3.0, "3", None, "cat", 2.5)] == ["3", "3", "3", None, "cat", "2.5"]
    assert class_names(["10", "2", "0", "1"]) == ["0", "1", "2", "10"]  # label 2 is class 2, not "10" < "2"
    assert class_names(["dog", "cat"]) == ["cat", "dog"]


def _model_with_recipe(tmp_path, **columns) -> str:
    recipe = TrainConfig(conditioning="class", label_column="label")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "training.json").write_text(json.dumps({"recipe": to_mapping(recipe), "columns": columns}))
    return str(tmp_path / "m")


def test_the_models_recipe_names_the_columns_and_an_index_setting_may_not_contradict_it(tmp_path):
    model = _model_with_recipe(tmp_path, caption=None, label="label")
    assert resolve_columns(model, None, IndexConfig()).label == "label"
    assert resolve_columns(model, None, IndexConfig(label_column="label")).label == "label"
    with pytest.raises(ConfigError, match="index.label_column is 'digit' but the model at .* was trained on labels "
                                          "from column 'label' \\(its training.json\\); remove index.label_column"):
        resolve_columns(model, None, IndexConfig(label_column="digit"))
    # A model without training.json: the config's train section, then the index's own setting.
    bare = tmp_path / "bare"
    bare.mkdir()
    assert resolve_columns(bare, TrainConfig(caption_column="text"), IndexConfig()).caption == "text"
    assert resolve_columns(bare, TrainConfig(), IndexConfig(caption_column="prompt")).caption == "prompt"
    assert resolve_columns(bare, TrainConfig(), IndexConfig()) == resolve_columns(bare, None, IndexConfig())


def test_quarantine_summary_names_reasons_counts_an_example_and_a_fix():
    errors = [(f"digit-{i:05d}", "missing or unknown class label") for i in range(1024)]
    errors += [("x", "example 'x': image is 2x2, its shorter side is below 8 pixels"),
               ("y", "example 'y': image is 3x3, its shorter side is below 8 pixels")]
    line = quarantine_summary(errors, 1030)
    assert line.startswith("1,026 of 1,030 examples quarantined: missing or unknown class label (1,024; e.g. "
                           "digit-00000) — set train.label_column")
    assert "image is 2x2, its shorter side is below 8 pixels (2; e.g. x) — lower index.min_image_side" in line
    assert "\n" not in line
    check_quarantine(errors[:3], 10, 0.5)  # 30 %: fine
    with pytest.raises(QuarantineError, match="max_quarantine_fraction=0.5"):
        check_quarantine(errors[:6], 10, 0.5)
    with pytest.raises(QuarantineError):
        check_quarantine(errors[:2], 2, 1.0)  # nothing usable is never committed


def test_an_empty_or_missing_version_is_refused_with_its_reason(tmp_path):
    store = IndexStore(str(tmp_path / "index"))
    with pytest.raises(ManifestMismatchError, match="holds no committed version; build one"):
        open_version(store)
    store.commit(IndexManifest(version="v00001-x", sequence=1, model=ModelRecord("f"), featurize={},
                               layout={"groups": []}, dtype="float16", dataset={}, shards=(), errors=Quarantine(7)))
    with pytest.raises(EmptyIndexError, match="has no rows \\(7 examples quarantined"):
        open_version(store)
    assert open_version(store, need_rows=False).version == "v00001-x"


def test_renamed_data_settings_say_where_they_went():
    with pytest.raises(ConfigError, match="data.synth_n is now data.synthetic.n"):
        from_mapping(ProjectConfig, {"data": {"uri": "x", "synth_n": 10}})
    cfg = from_mapping(ProjectConfig, {"data": {"uri": "x", "synthetic": {"n": 10, "holdout": [{"subject": "ring"}]}}})
    assert cfg.data.synthetic.n == 10 and cfg.data.synthetic.holdout == ((("subject", "ring"),),)
    assert from_mapping(ProjectConfig, {}).data.synthetic is None and from_mapping(ProjectConfig, {}).subset_train is None
