"""The exemplar check end to end on a tiny model: the customized model's images find the
exemplars; the same prompt without the customization does not; bad settings stop the run
with one line naming the setting."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from attribution_core.config_evaluate import ExemplarsConfig
from attribution_core.index.reader import load_index
from tests.pipelines.conftest import project, tiny_main_job
from tests.pipelines.test_cli import attribution, error_line


FEATURIZE = {"measurement": "square", "timesteps": {"count": 10, "strategy": "uniform"},
             "projection": {"k_in": 8, "k_out": 8}, "groups": {"preset": "function"}}  # configs/demo.yaml's


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_cluster) -> dict[str, str]:
    """A small text model trained on 96 synthetic images (16x16, half a minute) and its index."""
    from attribution_core.config import TrainConfig
    from attribution_core.data.writers import write_synthetic
    from attribution_core.models.training_dir import train_to_dir
    from pipelines.index.job import IndexRequest, run_index

    root = tmp_path_factory.mktemp("exemplar-model")
    data, model, out = str(root / "data"), root / "model", str(root / "index")
    write_synthetic(data, 96, 0, size=16, holdout=())
    train_to_dir(data, TrainConfig(resolution=16, widths=(16, 32), text_width=32, steps=500, batch_size=16,
                                   learning_rate=0.003, warmup_steps=10, ema_decay=0.9, attribute_dropout=0.3,
                                   caption_template="a {style} {subject|shape}[ on a {background} background]",
                                   threads=2), model)
    run_index(project(featurize=FEATURIZE), IndexRequest(dataset=data, model=str(model), out=out))
    return {"data": data, "out": out}


def _check_config(data: str, **exemplars):
    cfg = project(featurize=FEATURIZE)
    settings = {"columns": {"subject": "subject", "style": "style"}, "size": 3, "queries": 6, "distractors": 0,
                "k": 5, "steps": 40, "batch_size": 3, **exemplars}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, uri=data), evaluate=dataclasses.replace(
        cfg.evaluate, bootstrap=200, exemplars=ExemplarsConfig(**settings)))


@pytest.mark.slow  # fine-tunes and featurizes under two customized models
def test_customized_queries_find_the_exemplars_and_uncustomized_ones_do_not(trained):
    from pipelines.evaluation.exemplars import run_exemplars

    index = load_index(trained["out"])
    result = run_exemplars(_check_config(trained["data"]), index, None)
    assert [s["kind"] for s in result["sets"]] == ["subject", "style"] and all(s["size"] == 3 for s in result["sets"])
    assert result["distractors"] == len(index.example_ids) - 6  # every other row of the index
    table = result["table"]
    assert set(table) == {"subject", "style", "all"}
    assert set(table["all"]) == {"uniform", "served", "contrastive", "pixel_knn", "control"}
    everything = table["all"]
    served, control = everything["served"], everything["control"]
    assert served["queries"] == 12 and served["recall"] == everything["uniform"]["recall"]  # no weights: uniform
    # Among 93 rows, the customization's images find an exemplar in their top 5 (0.92 measured); the
    # same prompt to the model without the customization finds one as often as chance (0.17).
    assert served["recall"] >= 0.75 and served["map"] > 0.5
    assert control["recall"] <= served["recall"] - 0.5 and everything["pixel_knn"]["recall"] <= 0.5
    for row in everything.values():
        assert row["recall_ci"][0] <= row["recall"] <= row["recall_ci"][1]
    gallery = result["gallery"][0]
    assert len(gallery["exemplars"]) == 3 and gallery["first_exemplar_rank"] >= 1 and len(gallery["top"]) >= 1
    # Deterministic: the same settings measure the same numbers.
    again = run_exemplars(_check_config(trained["data"]), index, None)
    assert again["table"] == table


def test_folder_sets_are_checked_with_the_images_of_each_folder(full_build, tmp_path, good_rows):
    from pipelines.evaluation.exemplars import run_exemplars

    folder = tmp_path / "exemplars" / "mine"
    folder.mkdir(parents=True)
    for i, row in enumerate(good_rows[:3]):
        (folder / f"{i}.png").write_bytes(row["image"])
    cfg = _check_config(full_build["data"], columns={}, folder=str(tmp_path / "exemplars"), kinds={"mine": "style"},
                        queries=3, steps=10, bases=("tracin", "trak", "das"))
    result = run_exemplars(cfg, load_index(full_build["out"]), None)
    assert result["sets"] == [{"name": "mine", "kind": "style", "size": 3, "column": None, "value": None,
                               "served_by": "uniform"}]
    assert set(result["table"]) == {"style"} and result["distractors"] == len(load_index(full_build["out"]).example_ids)
    table = result["table"]["style"]  # the other bases beside the served one, with uniform weights
    assert {"basis:tracin", "basis:trak", "basis:das"} <= set(table)
    assert all(0 <= table[c]["recall"] <= 1 for c in table)


@pytest.mark.slow  # a subprocess that imports the stack
@pytest.mark.parametrize("change, setting", [
    ({"columns": {"texture": "style"}}, "evaluate.exemplars.columns: unknown kind 'texture'"),
    ({"size": 500}, "evaluate.exemplars.size:"),
    ({"columns": {"style": "artist"}}, "evaluate.exemplars.columns.style: the data has no column 'artist'"),
    ({"folder": "EMPTY", "columns": {}}, "evaluate.exemplars.folder:"),
    (None, "--only exemplars: the config has no evaluate.exemplars section"),
])
def test_bad_exemplar_settings_stop_with_one_line(tmp_path, change, setting):
    cfg = tiny_main_job(tmp_path)
    if change is None:
        del cfg["evaluate"]["exemplars"]
    elif change.get("folder") == "EMPTY":
        (tmp_path / "sets" / "empty").mkdir(parents=True)
        change = {**change, "folder": str(tmp_path / "sets")}
    if change is not None:
        cfg["evaluate"]["exemplars"].update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = attribution("evaluate", "--config", str(path), "--only", "exemplars", check=False)
    assert proc.returncode != 0
    line = error_line(proc)
    assert setting in line, line
    assert not Path(cfg["index"]["out"]).exists()  # refused before any indexing
