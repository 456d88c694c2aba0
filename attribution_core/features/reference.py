"""Slow, obviously correct references for the fast featurizer.

- ``per_example_gradients``: exact per-example gradients of the same measurement with
  ``torch.func.vmap(grad(functional_call))`` over examples (each example's rows form the
  model's batch inside the vmapped function), for the tracked layers' weights and biases.
- ``reference_features``: those gradients projected explicitly, ``P_out G P_in^T`` with
  ``G = [W_grad | b_grad]`` (``fan_out x fan_in``), i.e. ``(P_out (x) P_in) vec(G)``.
- ``reference_row_scale``: DAS's training-side scalar, one example and one row at a time.
- ``dense_projected_gradients``: the TRAK-style baseline: flatten all tracked parameters'
  gradients and multiply by a dense seeded Gaussian matrix, regenerated block by block (the
  full matrix would not fit in memory).
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call, grad, vmap

from attribution_core.models.adapters import TEXT_ENCODER, DiffusersAdapter, ExampleBatch
from attribution_core.config import FeaturizeConfig
from attribution_core.features.featurize import build_rows
from attribution_core.features.groups import GroupLayout
from attribution_core.features.measurement import contrast_measurement, get_measurement
from attribution_core.seeding import generator_for, projection_matrix


def tracked_parameter_names(layout: GroupLayout) -> list[str]:
    names = []
    for layer in layout.layers:
        names.append(f"{layer.name}.weight")
        if layer.has_bias:
            names.append(f"{layer.name}.bias")
    return names


def per_example_gradients(
    adapter: DiffusersAdapter, batch: ExampleBatch, cfg: FeaturizeConfig, layout: GroupLayout | None,
    *, per_row: bool = False, names: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Exact gradients ``{param name: Tensor[B, *param.shape]}`` of each example's mean
    measurement over its rows, for every tracked weight and bias of ``layout`` (or the
    denoiser parameters ``names``; ``per_row``: ``Tensor[B * r, ...]``, the gradient of each
    row's own measurement)."""
    model = adapter.denoiser
    measure = get_measurement(cfg.measurement)
    rows = build_rows(adapter, batch, cfg)
    b, r = len(batch), rows.rows_per_example
    if per_row:
        b, r = b * r, 1
    x_t = adapter.add_noise(rows.x0, rows.noise, rows.t)
    target = adapter.target(rows.x0, rows.noise, rows.t)
    if rows.contrast_cond is not None:  # Concept-TRAK: the output without the concept plays the target
        with torch.no_grad():
            target = adapter.denoise(x_t, rows.t, rows.contrast_cond)
        measure = contrast_measurement
    names = names if names is not None else tracked_parameter_names(layout)
    prefix = TEXT_ENCODER + "."
    text_names = [n for n in names if n.startswith(prefix)]
    all_params = dict(model.named_parameters())
    tracked = {n: (adapter.text_encoder.get_parameter(n[len(prefix):]) if n.startswith(prefix) else all_params[n]).detach()
               for n in names}
    frozen = {n: p.detach() for n, p in all_params.items() if n not in tracked}
    buffers = dict(model.named_buffers())
    cond_keys = sorted(rows.cond)
    text = adapter.text_encoder if text_names else None
    if text is not None:  # the prompt is encoded inside the differentiated function
        text_params = {n: p.detach() for n, p in text.named_parameters()}
        text_buffers = dict(text.named_buffers())
        ids = adapter.tokenize(list(batch.captions)).repeat_interleave(rows.rows_per_example, 0)

    def example_measure(params, x_t_ex, t_ex, target_ex, *cond_ex):
        # One example: x_t_ex [r, *sample], t_ex [r], cond_ex each [r, ...] (token ids last
        # when the text encoder's layers are tracked).
        cond = dict(zip(cond_keys, cond_ex))
        if text is not None:
            own = {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}
            states = functional_call(text, ({**text_params, **own}, text_buffers), (cond_ex[-1],))[0]
            cond["encoder_hidden_states"] = states
            params = {n: p for n, p in params.items() if not n.startswith(prefix)}
        out = functional_call(model, ({**frozen, **params}, buffers), (x_t_ex, t_ex), {**cond, "return_dict": False})[0]
        return measure(out, target_ex).mean()

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(b, r, *x.shape[1:])  # [B*r, ...] -> [B, r, ...]

    cond_args = [split(rows.cond[k]) for k in cond_keys] + ([split(ids)] if text is not None else [])
    in_dims = (None, 0, 0, 0) + (0,) * len(cond_args)
    with torch.enable_grad():
        grads = vmap(grad(example_measure), in_dims=in_dims)(
            tracked, split(x_t), split(rows.t), split(target), *cond_args
        )
    return grads


def reference_features(
    adapter: DiffusersAdapter, batch: ExampleBatch, cfg: FeaturizeConfig, layout: GroupLayout
) -> torch.Tensor:
    """``Tensor[B, k_total]`` float32: exact gradients, explicitly projected per layer (with
    ``normalize: timestep``: each row's, scaled to unit norm over all layers, then averaged)."""
    per_row = cfg.normalize == "timestep"
    grads = per_example_gradients(adapter, batch, cfg, layout, per_row=per_row)
    b = len(batch) * (cfg.rows_per_example if per_row else 1)
    flat = torch.zeros(b, layout.k_total, dtype=torch.float32)
    for layer in layout.layers:
        w = grads[f"{layer.name}.weight"].reshape(b, layer.fan_out, -1)  # [B, out, in(*kh*kw)]
        parts = [w]
        if layer.has_bias:
            parts.append(grads[f"{layer.name}.bias"].reshape(b, layer.fan_out, 1))
        g = torch.cat(parts, dim=2).float().cpu()  # [B, fan_out, fan_in]
        p_in = projection_matrix(cfg.seed, layer.name, "in", layout.k_in, cols=layer.fan_in)
        p_out = projection_matrix(cfg.seed, layer.name, "out", layout.k_out, cols=layer.fan_out)
        proj = p_out @ g @ p_in.T  # [B, k_out, k_in]
        flat[:, layer.offset : layer.offset + layer.dim] = proj.reshape(b, -1)
    if per_row:
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)  # [B*r, k_total]
        return unit.reshape(len(batch), -1, layout.k_total).mean(1)  # mean of the r unit rows
    return flat


def reference_row_scale(adapter: DiffusersAdapter, batch: ExampleBatch, cfg: FeaturizeConfig) -> torch.Tensor:
    """``Tensor[B]`` float64: ``mean_t e(t) / sqrt(sum_t e(t)^2)`` with ``e(t)`` the RMS of the
    denoising error of each of an example's rows, each row through the model on its own."""
    rows = build_rows(adapter, batch, cfg)
    x_t = adapter.add_noise(rows.x0, rows.noise, rows.t)
    target = adapter.target(rows.x0, rows.noise, rows.t)
    out = []
    with torch.no_grad():
        for i in range(len(batch)):
            errors = []
            for j in range(i * rows.rows_per_example, (i + 1) * rows.rows_per_example):
                cond = {k: v[j : j + 1] for k, v in rows.cond.items()}
                pred = adapter.denoise(x_t[j : j + 1], rows.t[j : j + 1], cond)
                errors.append(math.sqrt(float(((target[j : j + 1].double() - pred.double()) ** 2).mean())))
            out.append(sum(errors) / len(errors) / math.sqrt(sum(e * e for e in errors)))
    return torch.tensor(out, dtype=torch.float64)


def dense_projected_gradients(
    grads: dict[str, torch.Tensor], k: int, seed: int, *, block_rows: int = 65536, max_blocks: int | None = None
) -> torch.Tensor:
    """``Tensor[B, k]``: flattened per-example gradients times a dense Gaussian
    ``[n_params, k]`` matrix (entries N(0, 1/k)), generated ``block_rows`` rows at a time.
    ``max_blocks`` stops after that many blocks (a partial product, for timing)."""
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1).float()  # [B, n]
    n = flat.shape[1] if max_blocks is None else min(flat.shape[1], max_blocks * block_rows)
    out = torch.zeros(flat.shape[0], k, dtype=torch.float32)
    scale = 1.0 / math.sqrt(k)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        block = torch.randn((stop - start, k), generator=generator_for("dense", seed, start)) * scale
        out += flat[:, start:stop] @ block
    return out
