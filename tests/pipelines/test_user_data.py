"""The user's own data and models through the commands, as a user runs them: a class-labelled
Parquet set made with plain pyarrow (no marker of ours), a class-sub-folder image folder, a
pipeline directory without training.json, and a build that quarantines too much."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from attribution_core.config import TrainConfig
from attribution_core.data.images import encode_png
from attribution_core.index.store import IndexStore
from attribution_core.models.tiny import build_tiny_pipeline
from attribution_core.models.training_dir import train_to_dir
from tests.pipelines.conftest import tiny_main_job
from tests.pipelines.test_cli import attribution, error_line

CLASSES = ("bar", "column", "dot")


def class_image(kind: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A horizontal bar, a vertical bar or a dot, in a random colour and place on noise."""
    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    colour = rng.integers(120, 256, 3, dtype=np.uint8)
    y, x = rng.integers(3, size - 3, 2)
    if kind == 0:
        image[y - 1 : y + 1, 2 : size - 2] = colour
    elif kind == 1:
        image[2 : size - 2, x - 1 : x + 1] = colour
    else:
        image[y - 2 : y + 2, x - 2 : x + 2] = colour
    return image


def write_user_parquet(folder: Path, n: int, seed: int = 0, labels=lambda k: k) -> Path:
    """A user's Parquet set: example_id, image (PNG bytes), caption, label, in two files."""
    rng = np.random.default_rng(seed)
    kinds = [i % 3 for i in range(n)]
    table = pa.table({
        "example_id": [f"digit-{i:05d}" for i in range(n)],
        "image": [encode_png(class_image(k, rng)) for k in kinds],
        "caption": [f"a {CLASSES[k]}" for k in kinds],
        "label": [labels(k) for k in kinds],
    })
    folder.mkdir(parents=True)
    half = n // 2
    pq.write_table(table.slice(0, half), folder / "train-0.parquet")
    pq.write_table(table.slice(half), folder / "train-1.parquet")
    return folder


def write_class_folders(root: Path, per_class: int, extra: dict[str, int] | None = None) -> Path:
    """``root/<class>/<i>.png`` (the torchvision / imagefolder layout); ``extra`` adds
    folders of classes the model does not know."""
    rng = np.random.default_rng(1)
    for name, count in {**{c: per_class for c in CLASSES}, **(extra or {})}.items():
        (root / name).mkdir(parents=True)
        kind = CLASSES.index(name) if name in CLASSES else 2
        for i in range(count):
            (root / name / f"{i:03d}.png").write_bytes(encode_png(class_image(kind, rng)))
    return root


def class_config(tmp_path: Path, data: Path, **sections: dict) -> Path:
    """A user's config: their dataset (no synthetic section), a class-conditional recipe."""
    recipe = {"conditioning": "class", "label_column": "label"}
    exemplars = {"columns": {"general": "label"}, "size": 3, "queries": 3, "steps": 10, "batch_size": 3,
                 "distractors": 0}  # sets of one class each: the user's label column
    cfg = tiny_main_job(tmp_path, train=recipe, subset_train=recipe, weights={"aspects": ["general"]},
                        evaluate={"bases": ["dtrak"], "exemplars": exemplars})
    cfg["data"] = {"uri": str(data)}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_evaluate_on_a_users_class_labelled_parquet_set(tmp_path, ray_cluster):
    """The reported failure: integer labels under the recipe's label column, evaluate --skip-recall."""
    data = write_user_parquet(tmp_path / "mine", 48)
    config = class_config(tmp_path, data)
    proc = attribution("evaluate", "--config", str(config), "--skip-recall", "--json", env={"RAY_ADDRESS": ray_cluster})
    metrics = json.loads(proc.stdout)
    row = metrics["lds"]["dtrak"]
    assert np.isfinite([row["uniform"], row["learned"]]).all() and metrics["n_subsets"] == 4
    assert metrics["info"]["query_mix"] == "3 generated, 2 held-out real"
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["lds"]["dtrak"]["uniform"] == row["uniform"]
    assert not (data / "_dataset.json").exists() and sorted(p.name for p in data.iterdir()) == [
        "train-0.parquet", "train-1.parquet"], "the user's dataset is read, never written"
    # Every example of the universe indexed, with the label column and class names the model learned.
    universe = IndexStore(str(tmp_path / "eval" / "lds" / "index-square")).latest()
    assert universe.rows == 24 and universe.errors.rows == 0
    assert universe.dataset["label_column"] == "label"
    recipe = json.loads((tmp_path / "eval" / "lds" / "model" / "training.json").read_text())
    assert recipe["label_names"] == ["0", "1", "2"] and recipe["columns"]["label"] == "label"
    # The exemplar check on the user's integer labels: each set learned by the model as a new class.
    check = metrics["exemplar_check"]
    assert check["sets"][0]["kind"] == "general" and check["sets"][0]["column"] == "label" and check["prompt"] is None
    assert set(check["table"]) == {"general"} and check["table"]["general"]["served"]["queries"] == 3


@pytest.fixture(scope="module")
def class_model(tmp_path_factory) -> dict[str, str]:
    """A class-conditional model trained (a few steps) on a class-folder dataset."""
    root = tmp_path_factory.mktemp("classes")
    data = write_class_folders(root / "train", per_class=6)
    recipe = TrainConfig(resolution=8, widths=(8, 16), conditioning="class", steps=4, batch_size=8, warmup_steps=1,
                         threads=1)
    train_to_dir(str(data), recipe, root / "model")
    return {"root": str(root), "data": str(data), "model": str(root / "model")}


def test_evaluate_on_a_class_folder_dataset_with_the_models_class_names(tmp_path, ray_cluster, class_model):
    recipe = json.loads((Path(class_model["model"]) / "training.json").read_text())
    assert recipe["label_names"] == list(CLASSES) and recipe["columns"] == {"caption": None, "label": "label"}
    # The same classes plus one image of a class the model never saw.
    data = write_class_folders(tmp_path / "train", per_class=10, extra={"star": 1})
    config = class_config(tmp_path, data, model={"path": class_model["model"]})
    metrics = json.loads(attribution("evaluate", "--config", str(config), "--json",
                                     env={"RAY_ADDRESS": ray_cluster}).stdout)
    built = metrics["info"]["index_build"]
    assert built["rows"] == 30 and built["errors"] == 1 and metrics["info"]["aspects_learned"] == ["general"]
    assert "class-conditioned" in metrics["info"]["recall_skipped"]
    assert np.isfinite([metrics["lds"]["dtrak"]["uniform"], metrics["lds"]["dtrak"]["learned"]]).all()
    store = IndexStore(str(tmp_path / "index"))
    manifest = store.latest()
    assert manifest.dataset["layout"] == "classfolder" and manifest.dataset["label_column"] == "label"
    errors = [r for p in manifest.errors.shards for r in store.read_table(p).to_pylist()]
    assert [(e["example_id"], e["reason"]) for e in errors] == [("star/000.png", "missing or unknown class label")]
    universe = IndexStore(str(tmp_path / "eval" / "lds" / "index-square")).latest()
    assert universe.rows == 24 and universe.errors.rows == 0


def test_too_many_quarantined_is_not_committed(tmp_path, ray_cluster, class_model):
    """String labels a model trained on other class names cannot use: one line, exit 2, no version."""
    data = write_user_parquet(tmp_path / "mine", 12, labels=lambda k: ["cat", "dog", "cow"][k])
    config = class_config(tmp_path, data, model={"path": class_model["model"]})
    proc = attribution("index", "--config", str(config), env={"RAY_ADDRESS": ray_cluster}, check=False)
    assert proc.returncode == 2, proc.stderr
    last = error_line(proc)
    assert last.startswith("error: 12 of 12 examples quarantined: missing or unknown class label (12; e.g. digit-00000)"
                           " — set train.label_column"), last
    assert "index.max_quarantine_fraction=0.5" in last
    store = IndexStore(str(tmp_path / "index"))
    assert store.latest() is None and not any(store.is_committed(v) for v in store.list_versions())
    # Nothing to learn from: refused before any Ray Train worker starts, in one line.
    proc = attribution("learn-weights", "--config", str(config), env={"RAY_ADDRESS": ray_cluster}, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert error_line(proc) == (
        f"error: {str(tmp_path / 'index')!r} holds no committed version; build one with `attribution index`")


def test_a_mostly_quarantined_build_stops_after_its_first_rows(tmp_path, ray_cluster, class_model):
    """The same refusal, made after index.quarantine_check_rows examples instead of at the end."""
    data = write_user_parquet(tmp_path / "mine", 96, labels=lambda k: ["cat", "dog", "cow"][k])
    config = class_config(tmp_path, data, model={"path": class_model["model"]},
                          index={"quarantine_check_rows": 16, "batch_size": 8, "actors": 1})
    proc = attribution("index", "--config", str(config), env={"RAY_ADDRESS": ray_cluster}, check=False)
    assert proc.returncode == 2, proc.stderr
    last = error_line(proc)
    assert " examples quarantined: missing or unknown class label (" in last, last
    assert "of the first " in last and "of the 96 examples to featurize (index.quarantine_check_rows)" in last, last
    checked = int(last.split(" of ", 1)[0].removeprefix("error: ").replace(",", ""))
    assert 16 <= checked <= 96
    store = IndexStore(str(tmp_path / "index"))
    assert store.latest() is None and not any(store.is_committed(v) for v in store.list_versions())


def test_a_pipeline_directory_without_training_json(tmp_path, ray_cluster):
    """A model brought from elsewhere: index, learn-weights and evaluate --skip-lds work; LDS
    says in one line that it needs a recipe."""
    settings = tiny_main_job(tmp_path, weights={"aspects": ["general", "subject"]})
    model = build_tiny_pipeline("text", tmp_path / "brought", resolution=8, widths=(8, 16))
    assert not (model / "training.json").exists()
    settings["model"]["path"] = str(model)
    del settings["subset_train"]
    config = tmp_path / "brought.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = {"RAY_ADDRESS": ray_cluster}

    proc = attribution("evaluate", "--config", str(config), env=env, check=False)
    assert proc.returncode == 2 and error_line(proc) == (
        f"error: LDS retrains the model on data subsets and needs its training recipe: {model} has no training.json "
        "and the config has no subset_train section; add one (see configs/demo.yaml) or run "
        "`attribution evaluate --skip-lds`")

    metrics = json.loads(attribution("evaluate", "--config", str(config), "--skip-lds", "--json", env=env).stdout)
    assert metrics["lds"] == {} and metrics["info"]["aspects_learned"] == ["general", "subject"]
    recall = metrics["recall_at_10"]
    assert set(recall) == {"subject", "style", "background"}
    assert all(0.0 <= v <= 1.0 for row in recall.values() for v in row.values())
    assert metrics["info"]["index_build"]["rows"] == 48 and metrics["info"]["index_build"]["errors"] == 0


@pytest.mark.slow  # a subprocess that imports the stack, trains or starts Ray
def test_missing_dataset_without_a_synthetic_section(tmp_path):
    settings = tiny_main_job(tmp_path)
    settings["data"] = {"uri": str(tmp_path / "nowhere")}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(settings))
    proc = attribution("evaluate", "--config", str(config), "--skip-lds", check=False)
    assert proc.returncode == 2
    assert error_line(proc).startswith(
        f"error: data.uri: {str(tmp_path / 'nowhere')!r} holds no dataset; point it at yours")
    assert not (tmp_path / "nowhere").exists()
