"""Features of the published gradient pipelines, as references for the evaluation only.

D-TRAK's code (Zheng et al. 2024, sail-sg/D-TRAK) and DAS's (Lin et al. 2024,
Jinxu-Lin/DAS) featurize differently from this project's index:

- the gradient of the *whole* denoiser (every parameter: norms, biases and embeddings too),
  per example, of the measurement averaged over the timesteps (D-TRAK: squared output norm;
  DAS: output mean, each (timestep, draw) row's gradient scaled to unit norm first);
- one dense Gaussian projection of that gradient (TRAK's projector: unscaled N(0, 1)
  entries, seeded) to k dimensions;
- DAS's training side carries ``r(x) = mean_t e(t) / ||e||_2`` from the denoising error at
  ``residual_timesteps`` evenly spaced timesteps, one noise draw each (its code: all 1,000).

Here the timesteps and noise of the gradients are the index's own (``FeaturizeConfig``,
seeded per example; one draw per timestep, as the published code), so the comparison
isolates what is projected and how. The projection
is generated block by block from ``(seed, parameter name, block)`` and never materialised;
because it is linear, the projection of each parameter group's part of the gradient is kept
apart (``[N, M, k]``, the groups summing to the whole), which is what the weighting paper's
own setting weights.
"""

from __future__ import annotations

import dataclasses

import torch

from attribution_core.config import FeaturizeConfig
from attribution_core.features.groups import GroupLayout
from attribution_core.features.reference import per_example_gradients
from attribution_core.seeding import generator_for
from attribution_core.models.adapters import DiffusersAdapter, ExampleBatch

OTHER = "untracked"
"""The group of every parameter outside the layout's tracked layers (norms, embeddings, ...)."""


@dataclasses.dataclass(frozen=True)
class PublishedPipeline:
    """What one published pipeline computes."""

    name: str
    measurement: str
    unit_rows: bool  # each (timestep, draw) row's gradient scaled to unit norm before the mean
    kernel_scale: str  # "raw": (C + lambda I)^-1; "mean_abs": C divided by mean |C_ij| first
    residual: bool  # training scores times r(x)


PIPELINES = {
    "dtrak": PublishedPipeline("dtrak", "square", False, "raw", False),
    "das": PublishedPipeline("das", "das", True, "mean_abs", True),
}
LABELS = {"dtrak": "D-TRAK as published", "das": "DAS as published"}


def parameter_groups(adapter: DiffusersAdapter, layout: GroupLayout) -> tuple[list[tuple[str, int, int]], list[str]]:
    """``([(parameter name, size, group index)], group names)`` for every denoiser parameter:
    a tracked layer's weight and bias go to its layout group, the rest to ``OTHER``."""
    group_of = {layer.name: gi for gi, group in enumerate(layout.groups) for layer in layout.layers
                if layer.name in group.layers}
    names = [g.name for g in layout.groups]
    out = []
    for name, param in adapter.denoiser.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in group_of:
            out.append((name, param.numel(), group_of[module]))
        else:
            if OTHER not in names:
                names.append(OTHER)
            out.append((name, param.numel(), names.index(OTHER)))
    return out, names


def whole_gradients(adapter: DiffusersAdapter, batch: ExampleBatch, cfg: FeaturizeConfig, names: list[str],
                    *, unit_rows: bool) -> torch.Tensor:
    """``Tensor[B, p]`` float32: each example's exact gradient of its mean measurement over
    its rows with respect to the denoiser parameters ``names`` (flattened in that order);
    ``unit_rows``: the mean of its rows' gradients, each scaled to unit norm over all of them."""
    grads = per_example_gradients(adapter, batch, cfg, None, per_row=unit_rows, names=names)
    flat = torch.cat([grads[n].reshape(grads[n].shape[0], -1).float() for n in names], dim=1)  # [B(*r), p]
    if not unit_rows:
        return flat
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return unit.view(len(batch), cfg.rows_per_example, -1).mean(1)  # [B, r, p] -> [B, p]


class DenseProjection:
    """``x -> x P`` for a dense ``[p, k]`` Gaussian ``P`` (unscaled N(0, 1) entries, as TRAK's
    projector), generated ``block_rows`` parameter rows at a time from ``(seed, name, block)``,
    with each parameter group's share kept apart."""

    def __init__(self, parameters: list[tuple[str, int, int]], groups: int, *, k: int, seed: int,
                 block_rows: int = 8192) -> None:
        self.parameters, self.groups, self.k, self.seed, self.block_rows = parameters, groups, k, seed, block_rows

    @property
    def size(self) -> int:
        return sum(n for _, n, _ in self.parameters)

    def project(self, flat: torch.Tensor, by_group: bool = True) -> torch.Tensor:
        """``[N, p]`` -> ``[N, M, k]`` float32, group m holding ``x_m P_m`` (summed over m it is
        ``x P``); without ``by_group``, ``[N, 1, k]``: ``x P`` alone."""
        if flat.shape[1] != self.size:
            raise ValueError(f"gradients have {flat.shape[1]} coordinates, the projection {self.size}")
        out = torch.zeros(flat.shape[0], self.groups if by_group else 1, self.k)
        offset = 0
        for name, n, group in self.parameters:
            for start in range(0, n, self.block_rows):
                rows = min(self.block_rows, n - start)
                block = torch.randn((rows, self.k), generator=generator_for("dense-projection", self.seed, name, start))
                part = flat[:, offset + start : offset + start + rows]  # [N, rows]
                out[:, group if by_group else 0] += part @ block  # [N, rows] @ [rows, k]
            offset += n
        return out


@torch.no_grad()
def residual_scale(adapter: DiffusersAdapter, batch: ExampleBatch, timesteps: int, seed: int,
                   *, rows_per_pass: int = 1000) -> torch.Tensor:
    """``Tensor[B]`` float64: DAS's ``r(x) = mean_t e(t) / ||e||_2`` with ``e(t)`` the RMS of
    the denoising error at ``timesteps`` evenly spaced timesteps (one noise draw each, seeded
    by the example's id)."""
    encoded = adapter.encode(batch)
    steps = adapter.num_train_timesteps
    grid = torch.tensor([j * steps // timesteps for j in range(timesteps)], dtype=torch.long)
    out = []
    for i, example_id in enumerate(batch.example_ids):
        errors = []
        for start in range(0, timesteps, rows_per_pass):
            t = grid[start : start + rows_per_pass].to(encoded.x0.device)
            x0 = encoded.x0[i : i + 1].expand(len(t), *encoded.x0.shape[1:])
            noise = torch.stack([torch.randn(encoded.x0.shape[1:], generator=generator_for(
                "das-residual", seed, example_id, int(s))) for s in t.tolist()]).to(x0.device)
            cond = {k: v[i : i + 1].expand(len(t), *v.shape[1:]) for k, v in encoded.cond.items()}
            pred = adapter.denoise(adapter.add_noise(x0, noise, t), t, cond)
            errors.append((adapter.target(x0, noise, t).double() - pred.double()).pow(2).flatten(1).mean(1).sqrt())
        e = torch.cat(errors)
        out.append(float(e.mean() / e.norm().clamp_min(1e-30)))
    return torch.tensor(out, dtype=torch.float64)

