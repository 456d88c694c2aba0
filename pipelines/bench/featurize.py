"""``attribution bench featurize``: throughput of the fast featurizer against its baselines.

On one model, batch and set of inputs it times:

- the fast path (``Featurizer.flat``: Kronecker-factored projection from hooks);
- a plain training step (forward + backward with parameter gradients, no optimiser);
- a forward pass alone (context for the floor of forward + backward-to-activations);
- the TRAK-style dense baseline: exact per-example gradients (``vmap(grad)``) times a dense
  seeded Gaussian matrix to the same k_total, generated block by block. Generating that
  matrix costs ``n_params x k_total`` normal draws per batch; unless ``--full-dense`` is
  given, the first blocks are timed and the rest extrapolated linearly (the work per block
  is identical), and the JSON says which fraction was timed;
- the exactness of the fast path against the reference (max relative error per layer).

Prints one JSON object (``--json``) or a short table.
"""

from __future__ import annotations

import argparse
import math
import resource
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypedDict

import torch

from attribution_core.config import FeaturizeConfig, ProjectionConfig, TimestepConfig
from attribution_core.features.featurize import Featurizer, build_rows
from attribution_core.features.reference import dense_projected_gradients, per_example_gradients, reference_features
from attribution_core.models.adapters import DiffusersAdapter, ExampleBatch
from attribution_core.models.pipeline_dir import load_adapter
from attribution_core.models.tiny import build_tiny_pipeline, sd15_unet, text_encoder_for, word_tokenizer
from pipelines.output import print_report


def _timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, after one warm-up call each.

    The functions are called round-robin so that slow drifts of the machine (thermal,
    other processes) hit all of them alike instead of biasing the ratio between them.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def _sd15_adapter() -> DiffusersAdapter:
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    tokenizer = word_tokenizer(["a", "photo", "of", "cat"], max_length=77)
    # The text encoder is not tracked; one layer with SD 1.5's width gives real-shaped states.
    text = text_encoder_for(tokenizer, width=768, layers=1)
    return DiffusersAdapter(sd15_unet(), DDPMScheduler(), text_encoder=text, tokenizer=tokenizer)


def _batch(adapter: DiffusersAdapter, n: int) -> ExampleBatch:
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand((n, *adapter.image_shape), generator=g) * 2 - 1
    captions = tuple(f"a red star on a grid background {i}" for i in range(n))
    labels = torch.arange(n) % 2 if adapter.conditioning == "class" else None
    return ExampleBatch(tuple(f"bench-{i}" for i in range(n)), pixels, captions, labels)


def _train_step(adapter: DiffusersAdapter, featurizer: Featurizer, batch: ExampleBatch) -> Callable[[], None]:
    rows = build_rows(adapter, batch, featurizer.cfg)
    x_t = adapter.add_noise(rows.x0, rows.noise, rows.t)
    target = adapter.target(rows.x0, rows.noise, rows.t)
    params = list(adapter.denoiser.parameters())

    def step() -> None:
        for p in params:
            p.requires_grad_(True)
        try:
            out = adapter.denoise(x_t, rows.t, rows.cond)
            featurizer.measure(out, target).mean().backward()
        finally:
            for p in params:
                p.grad = None
                p.requires_grad_(False)

    def forward() -> None:
        with torch.no_grad():
            adapter.denoise(x_t, rows.t, rows.cond)

    step.forward = forward  # type: ignore[attr-defined]
    return step


def _dense_seconds(grads: dict[str, torch.Tensor], k: int, full: bool, block_rows: int = 65536) -> tuple[float, float]:
    """Seconds to project flattened gradients with a dense Gaussian [n_params, k] matrix
    (``dense_projected_gradients``), and the fraction of the parameter rows actually timed."""
    n = sum(g[0].numel() for g in grads.values())
    blocks = math.ceil(n / block_rows)
    timed = blocks if full else min(blocks, 3)
    start = time.perf_counter()
    dense_projected_gradients(grads, k, seed=0, block_rows=block_rows, max_blocks=timed)
    elapsed = time.perf_counter() - start
    covered = min(n, timed * block_rows) / n
    return elapsed / covered, covered


def _max_rel_err(fast: torch.Tensor, ref: torch.Tensor, featurizer: Featurizer) -> float:
    worst = 0.0
    for layer in featurizer.layout.layers:
        sl = slice(layer.offset, layer.offset + layer.dim)
        denom = ref[:, sl].norm().item()
        if denom > 0:
            worst = max(worst, (fast[:, sl] - ref[:, sl]).norm().item() / denom)
    return worst


class _FeaturizeTimes(TypedDict):
    model: str
    scale: str
    n_params: int
    tracked_layers: int
    groups: int
    k_total: int
    examples: int
    timesteps: int
    rows: int
    threads: int
    device: str
    featurize_s: float
    featurize_rows_per_s: float
    train_step_s: float
    train_step_rows_per_s: float
    forward_s: float
    ratio_vs_train_step: float
    forward_ratio_vs_train_step: float
    dense_rows_per_s: float | None
    speedup_vs_dense: float | None
    dense_projection_timed_fraction: float | None
    reference_max_rel_err: float | None


class FeaturizeBench(_FeaturizeTimes, total=False):
    """``bench featurize``: featurize time against a training step (and, on the tiny model,
    against exact per-example gradients with a dense projection, and the reference's error)."""

    peak_rss_mb_fast_and_train: float
    dense_grad_s: float
    dense_projection_s: float
    peak_rss_mb: float


def run(scale: str = "tiny", *, examples: int = 16, timesteps: int = 10, k: int = 8, repeats: int = 7,
        full_dense: bool = False) -> FeaturizeBench:
    torch.manual_seed(0)
    if scale == "tiny":
        with tempfile.TemporaryDirectory(prefix="bench-featurize-") as tmp:  # loaded into memory, then removed
            adapter = load_adapter(build_tiny_pipeline("text", tmp, resolution=16, widths=(32, 64)))
        model_desc = "UNet2DConditionModel widths (32, 64), 16x16 RGB pixels (the demo model)"
    else:
        adapter = _sd15_adapter()
        model_desc = "UNet2DConditionModel with Stable Diffusion 1.5 shapes, 64x64x4 latents"
    cfg = FeaturizeConfig(
        measurement="loss",
        timesteps=TimestepConfig(count=timesteps),
        projection=ProjectionConfig(k_in=k, k_out=k),
        max_rows_per_pass=max(examples * timesteps, 1),
    )
    featurizer = Featurizer(adapter, cfg)
    batch = _batch(adapter, examples)
    rows = examples * timesteps
    n_params = sum(p.numel() for p in adapter.denoiser.parameters())
    bench_repeats = repeats if scale == "tiny" else 1

    train = _train_step(adapter, featurizer, batch)
    timed = _timed(
        {"featurize": lambda: featurizer.flat(batch), "train": train, "forward": train.forward},  # type: ignore[attr-defined]
        bench_repeats,
    )
    featurize_s, train_s, forward_s = timed["featurize"], timed["train"], timed["forward"]
    result: FeaturizeBench = {
        "model": model_desc,
        "scale": scale,
        "n_params": n_params,
        "tracked_layers": len(featurizer.layout.layers),
        "groups": len(featurizer.layout.groups),
        "k_total": featurizer.layout.k_total,
        "examples": examples,
        "timesteps": timesteps,
        "rows": rows,
        "threads": torch.get_num_threads(),
        "device": str(adapter.device),
        "featurize_s": featurize_s,
        "featurize_rows_per_s": rows / featurize_s,
        "train_step_s": train_s,
        "train_step_rows_per_s": rows / train_s,
        "forward_s": forward_s,
        "ratio_vs_train_step": featurize_s / train_s,
        "forward_ratio_vs_train_step": forward_s / train_s,
        "dense_rows_per_s": None,
        "speedup_vs_dense": None,
        "dense_projection_timed_fraction": None,
        "reference_max_rel_err": None,
    }
    # ru_maxrss only grows: read it before the dense baseline's large per-example gradients.
    result["peak_rss_mb_fast_and_train"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if scale == "tiny":
        start = time.perf_counter()
        grads = per_example_gradients(adapter, batch, cfg, featurizer.layout)
        grad_s = time.perf_counter() - start
        proj_s, covered = _dense_seconds(grads, featurizer.layout.k_total, full_dense)
        dense_s = grad_s + proj_s
        small = batch.select(0, 2)
        ref = reference_features(adapter, small, cfg, featurizer.layout)
        result.update(
            dense_grad_s=grad_s,
            dense_projection_s=proj_s,
            dense_rows_per_s=rows / dense_s,
            speedup_vs_dense=dense_s / featurize_s,
            dense_projection_timed_fraction=covered,
            reference_max_rel_err=_max_rel_err(featurizer.flat(small), ref, featurizer),
        )
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main(args: argparse.Namespace) -> int:
    examples = args.examples or (16 if args.scale == "tiny" else 1)  # the parser refuses 0
    timesteps = args.timesteps or (10 if args.scale == "tiny" else 1)
    result = run(args.scale, examples=examples, timesteps=timesteps, k=args.k, repeats=args.repeats,
                 full_dense=args.full_dense)
    print_report(result, args.json)
    return 0
