"""The published pipelines as references: whole-model gradients, the dense blockwise
projection with each group's share, DAS's residual scale, the full kernel in dual form and
the paper's weight fit on a full cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attribution_core.config import FeaturizeConfig, TimestepConfig
from attribution_core.evaluation.dual_kernel import (DualKernel, cross_fitted_damping, crossed_predictions, kernel_lds,
                                                    mean_abs_gram)
from attribution_core.evaluation.published import (OTHER, DenseProjection, parameter_groups, residual_scale,
                                                   whole_gradients)
from attribution_core.features.featurize import build_rows
from attribution_core.features.groups import build_layout
from attribution_core.features.measurement import get_measurement
from attribution_core.seeding import generator_for
from attribution_core.weights.objective import fit_full_cache, full_cache_objective
from tests.conftest import make_batch

CFG = FeaturizeConfig(measurement="square", timesteps=TimestepConfig(count=3), noise_draws=1)


def _loop_gradients(adapter, batch, cfg: FeaturizeConfig, unit_rows: bool) -> torch.Tensor:
    """Each example's gradient by plain autograd, one (example, row) at a time."""
    model, measure = adapter.denoiser, get_measurement(cfg.measurement)
    params = list(model.parameters())
    frozen = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    rows = build_rows(adapter, batch, cfg)
    x_t = adapter.add_noise(rows.x0, rows.noise, rows.t)
    target = adapter.target(rows.x0, rows.noise, rows.t)
    r = rows.rows_per_example
    out = []
    for i in range(len(batch)):
        per_row = []
        for j in range(i * r, (i + 1) * r):
            cond = {k: v[j : j + 1] for k, v in rows.cond.items()}
            value = measure(adapter.denoise(x_t[j : j + 1], rows.t[j : j + 1], cond), target[j : j + 1]).sum()
            grads = torch.autograd.grad(value, params, allow_unused=True)
            per_row.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                      for g, p in zip(grads, params)]))
        stacked = torch.stack(per_row)  # [r, p]
        if unit_rows:
            stacked = stacked / stacked.norm(dim=1, keepdim=True)
        out.append(stacked.mean(0))
    for p, f in zip(params, frozen):
        p.requires_grad_(f)
    return torch.stack(out)


@pytest.mark.parametrize("unit_rows", [False, True])
def test_whole_gradients_equal_autograd_one_example_at_a_time(adapters, unit_rows):
    adapter = adapters["text"]
    batch = make_batch(adapter, n=2)
    names = [n for n, _ in adapter.denoiser.named_parameters()]
    fast = whole_gradients(adapter, batch, CFG, names, unit_rows=unit_rows)
    slow = _loop_gradients(adapter, batch, CFG, unit_rows)
    assert fast.shape == slow.shape == (2, sum(p.numel() for p in adapter.denoiser.parameters()))
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6 * float(slow.abs().max()))
    if unit_rows:  # a mean of unit vectors
        assert float(fast.norm(dim=1).max()) <= 1 + 1e-5


def test_dense_projection_is_one_seeded_matrix_split_by_group(adapters):
    adapter = adapters["unet"]
    layout = build_layout(adapter.denoiser, CFG.groups, CFG.projection)
    parameters, names = parameter_groups(adapter, layout)
    assert names[: len(layout.groups)] == [g.name for g in layout.groups] and names[-1] == OTHER
    untracked = {n for n, _, g in parameters if names[g] == OTHER}
    assert any("norm" in n for n in untracked) and not untracked & {f"{ly.name}.weight" for ly in layout.layers}
    group_of = {f"{ly.name}.weight": g.name for g in layout.groups for ly in layout.layers if ly.name in g.layers}
    assert all(names[g] == group_of[n] for n, _, g in parameters if n in group_of)
    assert sum(n for _, n, _ in parameters) == sum(p.numel() for p in adapter.denoiser.parameters())
    projection = DenseProjection(parameters, len(names), k=16, seed=42, block_rows=50)
    x = torch.randn(3, projection.size)
    by_group = projection.project(x)  # [3, M, 16]
    whole = projection.project(x, by_group=False)[:, 0]
    torch.testing.assert_close(by_group.sum(1), whole, rtol=1e-5, atol=1e-4)
    # the same as multiplying by the explicit matrix, generated the same way
    matrix = torch.cat([torch.randn((min(50, n - s), 16), generator=generator_for("dense-projection", 42, name, s))
                        for name, n, _ in parameters for s in range(0, n, 50)])
    torch.testing.assert_close(whole, x @ matrix, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(DenseProjection(parameters, len(names), k=16, seed=7).project(x, by_group=False)[:, 0], whole)


def test_das_residual_scale_is_scale_free_and_deterministic(adapters):
    adapter = adapters["text"]
    batch = make_batch(adapter, n=3)
    r = residual_scale(adapter, batch, timesteps=10, seed=0, rows_per_pass=4)
    assert r.shape == (3,) and bool(((r > 0) & (r <= 1 / math.sqrt(10) + 1e-12)).all())  # Cauchy-Schwarz
    torch.testing.assert_close(r, residual_scale(adapter, batch, timesteps=10, seed=0, rows_per_pass=10))
    assert not torch.allclose(r, residual_scale(adapter, batch, timesteps=10, seed=1))


@pytest.mark.parametrize("k", [6, 40])  # fewer and more dimensions than training rows
def test_dual_kernel_scores_equal_the_primal_inverse(k):
    g = torch.Generator().manual_seed(0)
    train, queries = torch.randn(12, k, generator=g, dtype=torch.float64), torch.randn(3, k, generator=g,
                                                                                      dtype=torch.float64)
    gram = train.T @ train
    for scale, c in (("raw", 1.0), ("mean_abs", float(gram.abs().mean()))):
        kernel = DualKernel(train, scale)
        assert kernel.c == pytest.approx(c)
        for damping in (0.01, 1.0):
            primal = queries @ torch.linalg.inv(gram / c + damping * torch.eye(k)) @ train.T  # [Q, N]
            torch.testing.assert_close(kernel.scores(kernel.project(queries), damping), primal, rtol=1e-6, atol=1e-8)
    scale = torch.rand(12, generator=g, dtype=torch.float64)
    scaled = DualKernel(train, "raw", scale)
    torch.testing.assert_close(scaled.scores(scaled.project(queries), 1.0),
                               DualKernel(train).scores(DualKernel(train).project(queries), 1.0) * scale)
    assert mean_abs_gram(train, block=5) == pytest.approx(float(gram.abs().mean()))


def test_each_half_takes_the_damping_best_on_the_other_half():
    halves = np.array([True, True, False, False])
    table = {0.1: np.array([0.9, 0.9, 0.1, 0.1]), 1.0: np.array([0.2, 0.2, 0.5, 0.5])}
    found = cross_fitted_damping([0.1, 1.0], lambda d, rows: table[d][rows], halves)
    assert found["dampings"] == [1.0, 0.1]  # the first half is scored at the second half's best, and back
    assert found["oracle"] == {"damping": 0.1, "lds": 0.5}


def test_the_paper_fit_on_a_full_cache_lowers_its_objective():
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(6, 40, 4, generator=g, dtype=torch.float64)
    cache[:, :5, 2] += 4.0  # group 2 singles out a few examples for every query
    w = fit_full_cache(cache, k=5, lambda_w=0.01, steps=200, learning_rate=0.05)
    uniform = torch.zeros(4, dtype=torch.float64)
    assert float(w.sum()) == pytest.approx(1.0) and int(w.argmax()) == 2
    assert float(full_cache_objective(torch.log(w), cache, 5, 0.01)) < float(full_cache_objective(uniform, cache, 5, 0.01))


def test_cross_fitted_predictions_score_each_half_at_its_own_damping():
    g = torch.Generator().manual_seed(1)
    train, queries = torch.randn(10, 30, generator=g, dtype=torch.float64), torch.randn(4, 30, generator=g,
                                                                                       dtype=torch.float64)
    masks = np.random.default_rng(0).random((6, 10)) < 0.5
    kernel = DualKernel(train)
    projected = kernel.project(queries)
    halves = np.array([True, False, True, False])
    crossed = crossed_predictions(kernel, projected, [0.1, 10.0], weights=[None, None], halves=halves, masks=masks)
    for rows, damping in ((halves, 0.1), (~halves, 10.0)):
        expected = kernel.scores(projected, damping).numpy()[rows] @ masks.T.astype(float)
        np.testing.assert_allclose(crossed[rows], expected)
    actual = np.random.default_rng(1).normal(size=(4, 6))
    per_query = kernel_lds(kernel, projected, 0.1, weights=None, masks=masks, actual=actual, rows=np.ones(4, dtype=bool))
    assert per_query.shape == (4,) and np.all(np.abs(per_query) <= 1)
