"""The model output that LDS correlates with summed attributions: for a query, the
featurizer's measurement averaged over the query's own timesteps and noise draws (the same
rows ``featurize`` differentiates), evaluated without gradients."""

from __future__ import annotations

import torch

from attribution_core.config import FeaturizeConfig
from attribution_core.features.featurize import build_rows
from attribution_core.features.measurement import get_measurement
from attribution_core.models.adapters import DiffusersAdapter, ExampleBatch


def model_outputs(adapter: DiffusersAdapter, batch: ExampleBatch, cfg: FeaturizeConfig) -> torch.Tensor:
    """``Tensor[B]`` float64: ``mean_r measurement(model(x_t_r, t_r, c), target_r)`` per example,
    with rows keyed by example id exactly as the featurizer draws them."""
    measure = get_measurement(cfg.measurement)
    per_pass = max(1, cfg.max_rows_per_pass // cfg.rows_per_example)
    out = []
    with torch.no_grad():
        for start in range(0, len(batch), per_pass):
            part = batch.select(start, start + per_pass)
            rows = build_rows(adapter, part, cfg)
            x_t = adapter.add_noise(rows.x0, rows.noise, rows.t)
            target = adapter.target(rows.x0, rows.noise, rows.t)
            per_row = measure(adapter.denoise(x_t, rows.t, rows.cond), target)  # [R]
            out.append(per_row.double().view(len(part), rows.rows_per_example).mean(1).cpu())
    return torch.cat(out)
