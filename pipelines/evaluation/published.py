"""Reference rows of the LDS table: D-TRAK and DAS as their published code computes them, and
the weighting paper's own setting on top of them (``evaluate.published``; evaluation only).

On the LDS universe model, in this process: the whole denoiser's per-example gradients of
the universe (training side), the evaluation queries and the learning queries; one dense
seeded projection per width; the full kernel in its dual form; scores at every damping of
the published grid. The published code keeps the damping of the best LDS on its own test
queries; here each half of the queries is scored at the damping best on the other half
(the published choice is reported beside it as ``oracle``). Featurize seconds per row are
measured for the reference and for this project's featurizer (same measurement, examples
and process), so their ratio comes from one run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
from typing import Any, TypedDict

import numpy as np
import torch

from attribution_core.config import FeaturizeConfig, ProjectConfig, to_mapping
from attribution_core.data.images import encode_png
from attribution_core.evaluation.dual_kernel import DualKernel, cross_fitted_damping, crossed_predictions, kernel_lds
from attribution_core.evaluation.intervals import TwoWayBootstrap
from attribution_core.evaluation.lds_rows import lds_cell, query_halves
from attribution_core.evaluation.published import (LABELS, PIPELINES, DenseProjection, parameter_groups, residual_scale,
                                                   whole_gradients)
from attribution_core.features.featurize import Featurizer
from attribution_core.features.groups import build_layout
from attribution_core.features.query import query_batch
from attribution_core.models.adapters import DiffusersAdapter, ExampleBatch
from attribution_core.models.fingerprint import model_fingerprint
from attribution_core.models.sampling import generate
from attribution_core.seeding import stable_seed
from attribution_core.weights.objective import fit_full_cache

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Inputs:
    """What every reference row scores: the universe (training side, dataset order), the
    evaluation queries, the learning queries of the paper's setting, and the ground truth."""

    train: ExampleBatch
    queries: ExampleBatch
    learning: ExampleBatch | None
    masks: np.ndarray  # [S, N]
    actual: np.ndarray  # [Q, S]
    boot: TwoWayBootstrap


def learning_batch(cfg: ProjectConfig, adapter, captions: list[str]) -> ExampleBatch:
    """The general learning queries of the basis weights (same prompts and seeds as
    ``learn-weights`` draws on the universe index): images the universe model generates."""
    wcfg, n = cfg.weights, cfg.evaluate.weights_queries
    text = adapter.conditioning == "text"
    rng = random.Random(stable_seed("general-prompts", wcfg.seed))
    prompts = [rng.choice(sorted(set(captions))) for _ in range(n)] if text else None
    images = generate(adapter, prompts=prompts, labels=list(range(adapter.num_classes)) or None, n=n,
                      seed=stable_seed("learning-queries", wcfg.seed, "general"), guidance=wcfg.guidance,
                      steps=wcfg.sample_steps)
    return query_batch(adapter, [encode_png(g.image) for g in images], prompts=[g.prompt for g in images],
                       labels=[g.label for g in images] if adapter.conditioning == "class" else None)


def _in_chunks(fn, batch: ExampleBatch, size: int = 16) -> torch.Tensor:
    return torch.cat([fn(batch.select(i, i + size)) for i in range(0, len(batch), size)])


class PaperSetting(TypedDict):
    """The paper's own weight learning on the published pipeline's kernel, against uniform."""

    uniform: float
    uniform_ci: list[float]
    learned: float
    learned_ci: list[float]
    difference: float
    difference_ci: list[float]
    weights: dict[str, dict[str, float]]
    """Damping -> group -> learned weight."""
    per_query: dict[str, list[float]]


def _paper_setting(kernel: DualKernel, *, groups_q: torch.Tensor, groups_l: torch.Tensor, dampings: list[float],
                   halves: np.ndarray, inputs: Inputs, cfg: ProjectConfig, names: list[str]) -> PaperSetting:
    """Per-group weights learned with the paper's objective on the learning queries (one-sided:
    ``tau_w = sum_m w_m g_m(q)^T K g(x)``), against uniform on the same kernel and halves."""
    wcfg = cfg.weights
    pq, pl = kernel.project(groups_q), kernel.project(groups_l)  # [Q, M, N], [L, M, N]
    learned = {}
    for d in sorted(set(dampings)):
        cache = kernel.scores(pl, d).permute(0, 2, 1)  # [L, N, M]
        learned[d] = fit_full_cache(cache, wcfg.top_k, wcfg.lambda_w, wcfg.steps, learning_rate=wcfg.learning_rate)
    m = groups_q.shape[1]
    uniform = torch.full((m,), 1.0 / m, dtype=torch.float64)
    pred_w = crossed_predictions(kernel, pq, dampings, weights=[learned[d] for d in dampings], halves=halves,
                                 masks=inputs.masks)
    pred_u = crossed_predictions(kernel, pq, dampings, weights=[uniform, uniform], halves=halves, masks=inputs.masks)
    cells = {name: lds_cell(inputs.boot, pred, inputs.actual) for name, pred in (("uniform", pred_u), ("learned", pred_w))}
    difference = inputs.boot.paired(pred_w, pred_u, inputs.actual)
    return PaperSetting(uniform=cells["uniform"]["lds"], uniform_ci=cells["uniform"]["ci"],
                        learned=cells["learned"]["lds"], learned_ci=cells["learned"]["ci"],
                        difference=difference[0], difference_ci=difference[1:],
                        weights={str(d): dict(zip(names, w.tolist())) for d, w in learned.items()},
                        per_query={k: v["per_query"] for k, v in cells.items()})


def published_rows(cfg: ProjectConfig, adapter, inputs: Inputs) -> dict[str, dict[str, Any]]:
    """``{"<pipeline>-<k>": row}`` for every pipeline and width of ``evaluate.published``;
    each row: LDS with its two-way interval, the dampings used, the published (oracle)
    choice, bytes and featurize seconds per row against this project's featurizer, and with
    ``paper_setting`` the learned-minus-uniform group weighting on the same features."""
    pcfg = cfg.evaluate.published
    layout = build_layout(adapter.tracked_model(), cfg.featurize.groups, cfg.featurize.projection)
    parameters, group_names = parameter_groups(adapter, layout)
    names = [n for n, _, _ in parameters]
    halves = query_halves(len(inputs.queries), stable_seed("published-halves", cfg.evaluate.seed))
    rows: dict[str, dict[str, Any]] = {}
    for name in pcfg.pipelines:
        spec = PIPELINES[name]
        # The index's timesteps and noise, one draw per timestep as the published code takes.
        fcfg = dataclasses.replace(cfg.featurize, measurement=spec.measurement, normalize="none", noise_draws=1)
        started = time.perf_counter()
        train = _in_chunks(lambda b: whole_gradients(adapter, b, fcfg, names, unit_rows=spec.unit_rows), inputs.train)
        gradient_s = time.perf_counter() - started
        started = time.perf_counter()
        scale = residual_scale(adapter, inputs.train, pcfg.residual_timesteps, pcfg.seed) if spec.residual else None
        residual_s = time.perf_counter() - started
        queries = _in_chunks(lambda b: whole_gradients(adapter, b, fcfg, names, unit_rows=spec.unit_rows),
                             inputs.queries)
        learning = (_in_chunks(lambda b: whole_gradients(adapter, b, fcfg, names, unit_rows=spec.unit_rows),
                               inputs.learning)
                    if pcfg.paper_setting and inputs.learning is not None else None)
        ours_s = featurize_seconds_per_row(adapter, dataclasses.replace(cfg.featurize, measurement=spec.measurement), inputs.train)
        for k in pcfg.dims:
            log.info("%s at %d dimensions: projecting %d x %d gradients", LABELS[name], k, len(train), train.shape[1])
            projection = DenseProjection(parameters, len(group_names), k=k, seed=pcfg.seed)
            started = time.perf_counter()
            every = projection.project(torch.cat([train, queries, *([learning] if learning is not None else [])]))
            project_s = (time.perf_counter() - started) * len(train) / len(every)  # the training rows' share
            n, q = len(train), len(queries)
            phi, groups_q, groups_l = every[:n].sum(1), every[n : n + q], every[n + q :]  # [N, k], [Q, M, k], [L, M, k]
            del every
            kernel = DualKernel(phi, spec.kernel_scale, scale)
            projected = kernel.project(groups_q.sum(1))  # [Q, N]
            grid = list(pcfg.damping_grid)
            chosen = cross_fitted_damping(
                grid, lambda d, rows: kernel_lds(kernel, projected, d, weights=None, masks=inputs.masks,
                                                 actual=inputs.actual, rows=rows), halves)
            predicted = crossed_predictions(kernel, projected, chosen["dampings"], weights=[None, None], halves=halves,
                                            masks=inputs.masks)
            cell = lds_cell(inputs.boot, predicted, inputs.actual)
            seconds = (gradient_s + residual_s + project_s) / len(train)
            row = {"label": f"{LABELS[name]} ({k:,} dimensions)", "lds": cell["lds"], "ci": cell["ci"],
                   "dampings": chosen["dampings"], "oracle": chosen["oracle"], "kernel_scale": spec.kernel_scale,
                   "bytes_per_row": 2 * k, "featurize_s_per_row": seconds, "ours_featurize_s_per_row": ours_s,
                   "speedup_of_ours": seconds / ours_s, "parameters": projection.size,
                   "seconds": {"gradients": gradient_s, "residual": residual_s, "projection": project_s},
                   "per_query": cell["per_query"], "predicted": predicted}
            if learning is not None:
                row["paper_setting"] = _paper_setting(kernel, groups_q=groups_q, groups_l=groups_l,
                                                      dampings=chosen["dampings"], halves=halves, inputs=inputs,
                                                      cfg=cfg, names=group_names)
            rows[f"{name}-{k}"] = row
    return rows


def featurize_seconds_per_row(adapter: DiffusersAdapter, fcfg: FeaturizeConfig, batch: ExampleBatch, repeats: int = 1) -> float:
    """Seconds per row of this project's featurizer under ``fcfg`` on ``batch``, in this
    process, after a warm-up (projections built, kernels loaded): the median of ``repeats``."""
    featurizer = Featurizer(adapter, fcfg)
    featurizer.flat_and_scale(batch.select(0, 2))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        featurizer.flat_and_scale(batch)
        times.append((time.perf_counter() - started) / len(batch))
    return sorted(times)[len(times) // 2]


MATCHING_BASIS = {"dtrak": "dtrak", "das": "das"}
"""The basis of this project's table measured on the same output function as each pipeline."""


def matching_basis(key: str) -> str:
    """The basis a reference row ``<pipeline>-<k>`` is compared with."""
    return MATCHING_BASIS[key.split("-")[0]]


def _cache_key(ctx, adapter) -> str:
    """What the reference rows depend on: the universe model, the queries, subsets and
    outputs, and every setting they read."""
    ecfg = ctx.cfg.evaluate
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps({"model": model_fingerprint(adapter), "published": to_mapping(ecfg.published),
                         "featurize": to_mapping(ctx.cfg.featurize), "weights": to_mapping(ctx.cfg.weights),
                         "weights_queries": ecfg.weights_queries, "seed": ecfg.seed, "bootstrap": ecfg.bootstrap,
                         "queries": list(ctx.batch.example_ids)}, sort_keys=True, default=str).encode())
    h.update(np.packbits(ctx.masks, axis=1).tobytes())
    h.update(np.ascontiguousarray(ctx.actual, dtype=np.float64).tobytes())
    return h.hexdigest()


def reference_rows(ctx, adapter, data,
                   served: dict[str, np.ndarray]) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """The reference rows of ``run_lds``'s context ``ctx``, each with the paired difference of
    the matching basis's served answer against it (``versus``, two-way interval), and each
    row's subset predictions ``[Q, S]`` by key (the frontier pairs its settings with them). Cached under
    ``<out>/lds/published/<key>.json`` (the key covers the model, queries, subsets, outputs
    and settings): a rerun measures nothing again, timings included."""
    cache = ctx.folder / "published" / f"{_cache_key(ctx, adapter)}.json"
    if cache.is_file():
        rows = json.loads(cache.read_text())
        log.info("published reference rows from %s", cache)
    else:
        train = ExampleBatch(tuple(data.example_ids), data.pixels,
                             tuple(data.captions) if data.captions else None, data.labels)
        learning = (learning_batch(ctx.cfg, adapter, data.captions or [])
                    if ctx.cfg.evaluate.published.paper_setting else None)
        inputs = Inputs(train=train, queries=ctx.batch, learning=learning, masks=ctx.masks, actual=ctx.actual,
                        boot=ctx.boot)
        rows = published_rows(ctx.cfg, adapter, inputs)
        for row in rows.values():
            row["predicted"] = np.asarray(row["predicted"]).tolist()
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp")
        tmp.write_text(json.dumps(rows))
        tmp.rename(cache)  # never half a file
    predictions = {}
    for key, row in rows.items():
        predictions[key] = predicted = np.asarray(row.pop("predicted"), dtype=np.float64)
        basis = matching_basis(key)
        if basis in served:
            row["versus"] = {basis: ctx.boot.paired(served[basis], predicted, ctx.actual)}
    return rows, predictions
