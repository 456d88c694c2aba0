"""Weight learning on Ray: distributed scans and Ray Train optimisation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from attribution_core.config import WeightsConfig
from attribution_core.weights.objective import group_queries, pooled_objective, weights_from_theta
from attribution_core.weights.pools import mining_weightings, pools_from_state
from attribution_core.weights.synthetic import BLOCK, synthetic_layout, synthetic_queries
from pipelines.weights.scan import scan
from pipelines.weights.train import AspectPools, TrainStorage, optimise

LAYOUT = synthetic_layout(groups=6, dim=32)  # signal strong enough to be found among N = 8k
N, Q, K = 2 * BLOCK + 100, 24, 5
SIGNAL = (1, 4)


@pytest.fixture(scope="module")
def pooled(ray_cluster):
    queries, _ = synthetic_queries(N, Q, LAYOUT, SIGNAL, seed=3)
    grouped = group_queries(queries, LAYOUT, None)
    source = {"kind": "synthetic", "n": N, "k_total": LAYOUT.k_total, "seed": 3}
    state = scan(source, [0, 1, 2], grouped, mining_weightings(len(LAYOUT.groups)), r=32, with_noise=True, partitions=2)
    pools = pools_from_state(state)
    return {"contrib": pools.contrib.numpy(), "valid": pools.valid.numpy(), "noise": state.noise.numpy(),
            "state": state, "grouped": grouped, "source": source}


def test_distributed_scan_equals_one_partition(pooled):
    one = scan(pooled["source"], [0, 1, 2], pooled["grouped"], mining_weightings(len(LAYOUT.groups)), r=32,
               with_noise=True, partitions=1)
    torch.testing.assert_close(one.noise, pooled["state"].noise)
    torch.testing.assert_close(one.scores, pooled["state"].scores)


def test_two_workers_equal_one_and_weights_concentrate_on_the_signal_groups(pooled, tmp_path):
    aspect = AspectPools(contrib=pooled["contrib"], valid=pooled["valid"], noise=pooled["noise"])
    theta0 = np.zeros((1, len(LAYOUT.groups)))
    wcfg = WeightsConfig(top_k=K, pool_size=32, lambda_w=0.01, steps=150, learning_rate=0.1, report_every=50)
    two = optimise([aspect], theta0, dataclasses.replace(wcfg, workers=2), TrainStorage(str(tmp_path)), name="two")
    one = optimise([aspect], theta0, dataclasses.replace(wcfg, workers=1), TrainStorage(str(tmp_path)), name="one")
    np.testing.assert_allclose(two.theta, one.theta, rtol=1e-6, atol=1e-9)
    assert [t["step"] for t in two.trajectory] == [50, 100, 150]
    w = weights_from_theta(torch.from_numpy(two.theta[0]))
    assert w[list(SIGNAL)].sum() > 0.8, w  # the groups that carry the signal
    # The objective went down, and it is the pooled objective of the returned theta.
    start = pooled_objective(torch.zeros(len(LAYOUT.groups), dtype=torch.float64), torch.from_numpy(aspect.contrib),
                             torch.from_numpy(aspect.valid), torch.from_numpy(aspect.noise), k=K, lambda_w=0.01)
    end = pooled_objective(torch.from_numpy(two.theta[0]), torch.from_numpy(aspect.contrib),
                           torch.from_numpy(aspect.valid), torch.from_numpy(aspect.noise), k=K, lambda_w=0.01)
    assert end < start
    assert two.trajectory[-1]["objective"] == pytest.approx(float(end), rel=1e-3)


def test_learn_weights_end_to_end_grows_pools_and_ties_the_artifact_to_its_version(tmp_path, ray_cluster, model_dirs,
                                                                                    monkeypatch):
    import tempfile

    from attribution_core.config import ProjectConfig, from_mapping
    from attribution_core.data.writers import write_synthetic
    from attribution_core.errors import ManifestMismatchError
    from attribution_core.index.store import IndexStore
    from attribution_core.weights.artifact import check_weights, weights_matrix
    from pipelines.index.job import IndexRequest, run_index
    from pipelines.weights.job import WeightsRequest, learn_weights
    from tests.pipelines.conftest import FEATURIZE

    data, out = str(tmp_path / "data"), str(tmp_path / "index")
    write_synthetic(data, 48, seed=4, size=16)
    settings = {"featurize": FEATURIZE, "index": {"batch_size": 16, "actors": 2, "kernel": "block_diagonal",
                                                            "damping_rule": "fixed"},
                "weights": {"aspects": ["general", "subject"], "queries_per_aspect": 4, "sample_steps": 3,
                            "top_k": 3, "pool_size": 3, "max_rounds": 4, "steps": 20, "report_every": 10,
                            "workers": 2, "validation_queries": 6, "holdout_queries": 3}}
    cfg = from_mapping(ProjectConfig, settings)
    run_index(cfg, IndexRequest(dataset=data, model=model_dirs["text"], out=out))
    scratch = tmp_path / "temp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where Ray Train's run folders go
    result = learn_weights(cfg, WeightsRequest(index=out))
    assert list(scratch.iterdir()) == [], "learn-weights left its Ray Train run folders behind"
    monkeypatch.undo()
    store = IndexStore(out)
    manifest = store.latest()
    document = store.read_json(f"versions/{manifest.version}/weights/learned.json")
    assert result["artifact"].endswith(f"versions/{manifest.version}/weights/learned.json")
    assert set(document["aspects"]) == {"general", "subject"} and document["k"] == 3
    assert document["groups"] == [g["name"] for g in manifest.layout["groups"]]
    for info in document["aspects"].values():
        assert abs(sum(info["weights"]) - 1) < 1e-9 and min(info["weights"]) >= 0 and info["queries"] == 4
    # Pools of k candidates under the mining weightings miss some top-k of the learned
    # weights; rescans grow them until none is missed.
    assert result["recall_by_round"][-1] == {"general": 1.0, "subject": 1.0}
    assert document["trajectory"][-1]["round"] == result["rounds"]
    check_weights(document, manifest)
    assert weights_matrix(document, ["subject", "uniform"]).shape == (2, len(document["groups"]))
    _validation_equals_offline_recall(cfg, out, manifest, document, model_dirs["text"])
    _shrinkage_is_the_objective_on_held_out_queries(cfg, store, manifest, document, model_dirs["text"])
    rebuilt = run_index(from_mapping(ProjectConfig, {**settings, "featurize": {**FEATURIZE, "seed": 7}}),
                        IndexRequest(dataset=data, model=model_dirs["text"], out=out))
    with pytest.raises(ManifestMismatchError, match="learned on index version"):
        check_weights(document, store.manifest(rebuilt["version"]))


def _validation_equals_offline_recall(cfg, out: str, manifest: dict, document: dict, model: str) -> None:
    """The subject's validation Recall (one distributed scan of the index) equals the
    Recall table computed offline from the same queries over the index in memory, and the
    weighting that answers the subject (and 'general') is the one the choice rule picks."""
    from attribution_core.evaluation.recall import aspect_recall_table
    from attribution_core.index.opening import version_featurizer
    from attribution_core.index.reader import load_index
    from attribution_core.models.sampling import generate
    from attribution_core.seeding import stable_seed
    from attribution_core.weights.choice import choose
    from pipelines.models import load_model_dir
    from pipelines.weights.queries import featurize_generated
    from pipelines.weights.validation import validation_set

    found = document["aspects"]["subject"]["validation"]
    general = document["aspects"]["general"]["validation"]  # a general query asks for its caption's attributes
    assert set(general["recall"]) == {"general", "uniform"} and document["aspects"]["general"]["choice"]["by"] == "validation"
    assert document["aspects"]["general"]["answered_by"] == choose(general["gains"], ["general", "uniform"])
    assert found["queries"] == 6 and found["k"] == 3 and set(found["recall"]) == {"subject", "general", "uniform"}
    assert document["aspects"]["subject"]["answered_by"] == choose(found["gains"], ["subject", "general", "uniform"])
    wcfg = cfg.weights
    prompts, asked, values = validation_set(manifest.dataset, caption_column=None, label_column=None,
                                            aspects=["subject"], columns=["subject"], n=6, seed=wcfg.seed)
    adapter = load_model_dir(model)
    images = generate(adapter, prompts=prompts, n=6, seed=stable_seed("validation-queries", wcfg.seed),
                      guidance=wcfg.guidance, steps=wcfg.sample_steps)
    index = load_index(out)
    features = featurize_generated(version_featurizer(adapter, manifest, cfg.featurize.max_rows_per_pass), images)
    table = aspect_recall_table(features, index.layout, index.kernel, index.features, weights=document,
                                query_attributes=asked,
                                train_attributes={"subject": [values["subject"][i] for i in index.example_ids]}, k=3)
    offline = {"subject": table["subject"]["aspect"], "general": table["subject"]["general"],
               "uniform": table["subject"]["uniform"]}
    assert found["recall"] == pytest.approx(offline, abs=1e-4)
    assert table["subject"]["validated"] == offline[document["aspects"]["subject"]["answered_by"]]


def _shrinkage_is_the_objective_on_held_out_queries(cfg, store, manifest: dict, document: dict, model: str) -> None:
    """Each aspect's stored weights are its learned ones moved toward uniform by the recorded
    amount, the one of the lowest held-out objective, and that objective (from one scan of the
    index) equals the paper's objective computed over the whole index in memory."""
    from attribution_core.index.opening import version_featurizer
    from attribution_core.index.reader import load_index
    from attribution_core.weights.objective import contributions, group_queries
    from attribution_core.weights.shrinkage import choose_shrinkage, shrunk
    from pipelines.models import load_model_dir
    from pipelines.weights.queries import learning_queries, prompts_for

    wcfg = dataclasses.replace(cfg.weights, queries_per_aspect=3)
    featurizer = version_featurizer(load_model_dir(model), manifest, cfg.featurize.max_rows_per_pass)
    index = load_index(store.uri)
    for aspect, info in document["aspects"].items():
        found = info["shrinkage"]
        objective = {float(a): v for a, v in found["objective"].items()}
        assert found["queries"] == 3 and found["a"] == choose_shrinkage(objective)
        learned = torch.tensor(info["learned"], dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(info["weights"], dtype=torch.float64), shrunk(learned, found["a"]))
        prompts = prompts_for(aspect, wcfg, store, manifest.shard_paths, stream="holdout-prompts")
        features, _ = learning_queries(featurizer, aspect, prompts, wcfg, stream="holdout-queries")
        cache = contributions(group_queries(features, index.layout, index.kernel), index.features).double()  # [Q, N, M]
        for a, value in objective.items():
            w = shrunk(learned, a)
            scores = cache @ w
            full = (-torch.topk(scores, wcfg.top_k, dim=1).values.mean(1) / scores.norm(dim=1)).mean() + wcfg.lambda_w * (w**2).sum()
            assert value == pytest.approx(float(full), rel=1e-3, abs=1e-5), (aspect, a)
