"""``Featurizer``: per-example, per-group projected gradient features of a diffusion model.

Every stage featurizes through a ``Featurizer`` built from the model and the index
version's featurize settings (the index job's actors, learning and damping queries, the
evaluation, the endpoint's featurizer; ``index.opening.version_featurizer``), so
training-side and query-side features match by construction:

    features = Featurizer(adapter, cfg)(batch)     # {group: Tensor[B, k_group]} float32

``featurize(adapter, batch, cfg)`` is the same for one-off calls (tests, notebooks): it keeps
the featurizer on the adapter.

An example is measured on ``T x noise_draws`` rows (timesteps and noise from its own seeded
generator, see ``seeding``); its feature is the projected gradient of the mean measurement
over those rows. Batch size, batch composition and row order do not change any value
(beyond float rounding of batched kernels).
"""

from __future__ import annotations

import dataclasses
import logging
import threading

import torch

from attribution_core.models.adapters import TEXT_ENCODER, DiffusersAdapter, ExampleBatch
from attribution_core.features.capture import KroneckerCapture
from attribution_core.config import FeaturizeConfig
from attribution_core.errors import ConfigError
from attribution_core.features.groups import GroupLayout, build_layout
from attribution_core.features.measurement import ROW_SCALED, contrast_measurement, get_measurement, residual_scale
from attribution_core.seeding import generator_for

log = logging.getLogger(__name__)

_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass
class Rows:
    """Inputs of one forward pass, example-major: row ``i`` belongs to example ``i // r``."""

    x0: torch.Tensor  # [R, *sample_shape] clean sample (pixels or latents)
    noise: torch.Tensor  # [R, *sample_shape]
    t: torch.Tensor  # [R] int64
    cond: dict[str, torch.Tensor]  # each [R, ...]
    rows_per_example: int
    contrast_cond: dict[str, torch.Tensor] | None = None  # the conditioning without the concept, [R, ...]


def example_timesteps(cfg: FeaturizeConfig, example_id: str, num_train_timesteps: int) -> list[int]:
    """The T timesteps of one example under ``cfg.timesteps``."""
    ts = cfg.timesteps
    if ts.strategy == "uniform":  # D-TRAK's grid: 0, N/T, 2N/T, ...
        return [j * num_train_timesteps // ts.count for j in range(ts.count)]
    if ts.strategy == "fixed":
        bad = [v for v in ts.values if v >= num_train_timesteps]
        if bad:
            raise ConfigError(
                f"timesteps.values {bad} are outside the scheduler's 0..{num_train_timesteps - 1}"
            )
        return list(ts.values)
    out = []
    for j in range(ts.count):
        g = generator_for("timestep", cfg.seed, example_id, j)
        out.append(int(torch.randint(0, num_train_timesteps, (1,), generator=g).item()))
    return out


def example_noise(cfg: FeaturizeConfig, example_id: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Noise ``Tensor[T * noise_draws, *shape]`` float32: draw ``j * noise_draws + n`` is the
    n-th noise sample at the example's j-th timestep, each from its own generator."""
    draws = []
    for draw in range(cfg.rows_per_example):
        g = generator_for("noise", cfg.seed, example_id, draw)
        draws.append(torch.randn(shape, generator=g, dtype=torch.float32))
    return torch.stack(draws)


def build_rows(adapter: DiffusersAdapter, batch: ExampleBatch, cfg: FeaturizeConfig) -> Rows:
    """Validate ``batch`` and expand it to its example-major measurement rows."""
    adapter.check(batch)
    encoded = adapter.encode(batch)
    r = cfg.rows_per_example
    device = encoded.x0.device
    sample_shape = tuple(encoded.x0.shape[1:])
    n_steps = adapter.num_train_timesteps
    t = torch.tensor(
        [
            step
            for eid in batch.example_ids
            for step in example_timesteps(cfg, eid, n_steps)
            for _ in range(cfg.noise_draws)
        ],
        dtype=torch.long,
        device=device,
    )
    noise = torch.cat([example_noise(cfg, eid, sample_shape) for eid in batch.example_ids]).to(device)
    x0 = encoded.x0.repeat_interleave(r, dim=0)  # [B, ...] -> [B*r, ...]
    cond = {k: v.repeat_interleave(r, dim=0) for k, v in encoded.cond.items()}
    contrast = None
    if batch.contrast_captions is not None:
        contrast = {"encoder_hidden_states": adapter.encode_text(list(batch.contrast_captions)).repeat_interleave(r, 0)}
    return Rows(x0=x0, noise=noise, t=t, cond=cond, rows_per_example=r, contrast_cond=contrast)


class Featurizer:
    """Featurizes batches with a fixed adapter and config; projections are built once.

    Pipelines build one per actor in ``__init__`` and call it per batch. Calls on one
    model are serialised by a lock (capture hooks hold per-pass state and would see every
    pass through the model), so featurizers may be shared by the threads of a replica.
    """

    def __init__(self, adapter: DiffusersAdapter, cfg: FeaturizeConfig) -> None:
        self.adapter = adapter
        self.cfg = cfg
        self.measure = get_measurement(cfg.measurement)
        tracked = adapter.tracked_model()
        self.layout: GroupLayout = build_layout(tracked, cfg.groups, cfg.projection)
        self.capture = KroneckerCapture(tracked, self.layout, cfg.seed, adapter.device)
        # Text-encoder layers are tracked: the prompt is encoded inside the differentiated pass.
        self.text_tracked = any(layer.name.startswith(TEXT_ENCODER + ".") for layer in self.layout.layers)
        # One lock per model: hooks of any featurizer on it would see every pass.
        self._lock = adapter.__dict__.setdefault("_featurize_lock", threading.Lock())

    def _autocast(self) -> torch.autocast:
        device = self.adapter.device.type
        enabled = device == "cuda" and self.cfg.precision in _AUTOCAST
        return torch.autocast(device, dtype=_AUTOCAST.get(self.cfg.precision), enabled=enabled)

    @property
    def row_scaled(self) -> bool:
        """Whether training examples carry a score scale (``flat_and_scale``) under this measurement."""
        return self.cfg.measurement in ROW_SCALED

    def flat(self, batch: ExampleBatch) -> torch.Tensor:
        """Features as one ``Tensor[B, k_total]`` float32 on CPU, in the layout's order (the
        query side: no row scale)."""
        return self.flat_and_scale(batch)[0]

    def flat_and_scale(self, batch: ExampleBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(features Tensor[B, k_total], scale Tensor[B] | None)`` float32 on CPU: the
        training side, whose scores are multiplied by ``scale`` under a row-scaled measurement
        (DAS's residual profile; None for the others)."""
        per_pass = max(1, self.cfg.max_rows_per_pass // self.cfg.rows_per_example)
        with self._lock:
            parts = [self._pass(batch.select(i, i + per_pass)) for i in range(0, len(batch), per_pass)]
        scales = [scale for _, scale in parts]
        return torch.cat([flat for flat, _ in parts]), torch.cat(scales) if self.row_scaled else None

    def _pass(self, batch: ExampleBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = build_rows(self.adapter, batch, self.cfg)
        x_t = self.adapter.add_noise(rows.x0, rows.noise, rows.t)
        target = denoising_target = self.adapter.target(rows.x0, rows.noise, rows.t)
        measure = self.measure
        if rows.contrast_cond is not None:  # before the hooks: this pass is not differentiated
            with torch.no_grad(), self._autocast():
                without = self.adapter.denoise(x_t, rows.t, rows.contrast_cond)
            target, measure = without, contrast_measurement
        per_row = self.cfg.normalize == "timestep"
        with self.capture.capturing(len(batch), rows.rows_per_example, per_row), torch.enable_grad():
            with self._autocast():
                cond = rows.cond
                if self.text_tracked:  # one text pass per row, so each row's gradient reaches its layers
                    ids = self.adapter.tokenize(list(batch.captions)).repeat_interleave(rows.rows_per_example, 0)
                    cond = {**cond, "encoder_hidden_states": self.adapter.text_states(ids)}
                output = self.adapter.denoise(x_t, rows.t, cond)
            measured = measure(output, target)  # [R]
            scale = residual_scale(output, denoising_target, rows.rows_per_example).cpu() if self.row_scaled else None
            # Sum over examples of each example's mean over its rows: the backward pass then
            # delivers each row's share of its own example's gradient.
            total = measured.view(len(batch), rows.rows_per_example).mean(1).sum()
            if total.requires_grad:
                total.backward()
        flat = self.capture.collect()
        if per_row:
            flat = mean_of_unit_rows(flat, rows.rows_per_example)
        return flat.cpu(), scale

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Tensor[B, k_total]`` -> ``{group: Tensor[B, k_group]}`` in the layout's order."""
        return {g.name: flat[:, g.offset : g.offset + g.dim].clone() for g in self.layout.groups}

    def __call__(self, batch: ExampleBatch) -> dict[str, torch.Tensor]:
        return self.split(self.flat(batch))


def featurize(adapter: DiffusersAdapter, batch: ExampleBatch, cfg: FeaturizeConfig) -> dict[str, torch.Tensor]:
    """Per-group features ``{group: Tensor[B, k_group]}`` (float32, CPU) of ``batch``.

    The featurizer (layout + projections) is built on first use for an (adapter, cfg) pair
    and kept on the adapter, so it lives exactly as long as the model does.
    """
    cache: dict[FeaturizeConfig, Featurizer] = adapter.__dict__.setdefault("_featurizers", {})
    featurizer = cache.get(cfg)
    if featurizer is None:
        featurizer = cache[cfg] = Featurizer(adapter, cfg)
    return featurizer(batch)


def mean_of_unit_rows(rows: torch.Tensor, rows_per_example: int) -> torch.Tensor:
    """``Tensor[B * r, k]`` -> ``Tensor[B, k]``: each row scaled to unit L2 norm (a zero row
    stays zero), then the r rows of each example averaged."""
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)  # [B*r, k]
    return unit.view(-1, rows_per_example, rows.shape[1]).mean(1)  # [B, r, k] -> [B, k]


def nonfinite_rows(flat: torch.Tensor) -> torch.Tensor:
    """``Tensor[B]`` bool: rows of a ``Tensor[B, k]`` feature matrix holding NaN or Inf."""
    return ~torch.isfinite(flat).all(dim=1)
