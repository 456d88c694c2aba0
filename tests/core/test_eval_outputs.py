"""The LDS model output: deterministic per query, independent of batching, the featurizer's rows."""

from __future__ import annotations

import torch

from attribution_core.config import FeaturizeConfig, from_mapping
from attribution_core.evaluation.outputs import model_outputs
from attribution_core.features.measurement import get_measurement
from tests.conftest import make_batch

CFG = from_mapping(FeaturizeConfig, {"measurement": "square", "timesteps": {"count": 3, "strategy": "uniform"},
                                     "max_rows_per_pass": 6})


def test_outputs_are_per_query_and_independent_of_batching(adapters):
    adapter = adapters["text"]
    batch = make_batch(adapter, n=5, seed=1)
    whole = model_outputs(adapter, batch, CFG)  # 2 examples per pass: 3 passes
    one_by_one = torch.cat([model_outputs(adapter, batch.select(i, i + 1), CFG) for i in range(5)])
    assert whole.shape == (5,) and whole.dtype == torch.float64
    torch.testing.assert_close(whole, one_by_one, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(model_outputs(adapter, batch, CFG), whole)  # same rows every time


def test_outputs_are_the_mean_measurement_over_the_featurizer_rows(adapters):
    from attribution_core.features.featurize import build_rows

    adapter = adapters["unet"]
    batch = make_batch(adapter, n=2, seed=2)
    rows = build_rows(adapter, batch, CFG)
    with torch.no_grad():
        x_t = adapter.add_noise(rows.x0, rows.noise, rows.t)
        per_row = get_measurement("square")(adapter.denoise(x_t, rows.t, rows.cond),
                                            adapter.target(rows.x0, rows.noise, rows.t))
    expected = per_row.double().view(2, 3).mean(1)
    torch.testing.assert_close(model_outputs(adapter, batch, CFG), expected, rtol=1e-6, atol=1e-9)
