"""Measurement functions: the scalar output of the diffusion model whose gradient is featurized.

A measurement maps the denoiser output of each (example, timestep, noise) row to one number;
an example's measurement is the mean over its rows (averaged over T timesteps and the noise
draws, as in TRAK / D-TRAK for diffusion models).

- ``loss``: the denoising objective ``mean((eps_theta(x_t, t, c) - target)^2)``, used by
  TRAK and TracIn (Park et al. 2023; Pruthi et al. 2020).
- ``square``: ``mean(eps_theta(x_t, t, c)^2)``, the squared norm of the output, which
  D-TRAK (Zheng et al. 2024) found to attribute better than the loss.
- ``das``: ``mean(eps_theta(x_t, t, c))``, whose gradient is the output Jacobian summed over
  its coordinates, ``J^T 1 / d`` (DAS, Lin et al. 2024, arXiv 2410.18639). DAS scores a
  training example by that feature times a scalar of the example's own (``row_scale``): how
  flat its denoising error is over its timesteps. The query side has no such scalar.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attribution_core.config import MEASUREMENTS
from attribution_core.errors import ConfigError

Measurement = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(model_output Tensor[R, ...], target Tensor[R, ...]) -> Tensor[R] float32."""


def loss_measurement(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # [R, C, H, W] -> [R]
    return (output.float() - target.float()).pow(2).flatten(1).mean(1)


def square_measurement(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    del target  # D-TRAK's output function does not look at the target
    return output.float().pow(2).flatten(1).mean(1)


def das_measurement(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    del target  # DAS measures the output itself; the target enters only the row scale
    return output.float().flatten(1).mean(1)


def residual_scale(output: torch.Tensor, target: torch.Tensor, rows_per_example: int) -> torch.Tensor:
    """DAS's training-side scalar ``r(x) = mean_t e_x(t) / ||e_x||_2`` with the per-row error
    ``e_x(t) = sqrt(mean_j (target - eps_theta)_j^2)``, over an example's own rows (its T
    timesteps x noise draws; DAS uses one draw at each of all 1000 timesteps). Scale-free:
    ``1 / sqrt(rows)`` when the error is the same at every row, smaller when a few rows
    dominate. [R, ...] x [R, ...] -> [R / rows_per_example] float32 (0 when every error is 0)."""
    err = (target.float() - output.detach().float()).pow(2).flatten(1).mean(1).sqrt()  # [R]
    err = err.view(-1, rows_per_example)  # [B, r]
    return err.mean(1) / err.norm(dim=1).clamp_min(1e-30)


def contrast_measurement(output: torch.Tensor, without: torch.Tensor) -> torch.Tensor:
    """Concept-TRAK's query measurement (arXiv 2507.06547): ``mean(eps_c * sg(eps_c - eps_c-))``
    with ``eps_c`` the output under the full prompt and ``without`` (``eps_c-``) the output
    under the prompt without the concept. Its gradient is ``J_c^T (eps_c - eps_c-) / d``:
    the direction in which the concept moves the prediction, in place of D-TRAK's
    ``J^T eps``. [R, ...] x [R, ...] -> [R]."""
    out = output.float()
    return (out * (out.detach() - without.float())).flatten(1).mean(1)


_REGISTRY: dict[str, Measurement] = {"loss": loss_measurement, "square": square_measurement, "das": das_measurement}
ROW_SCALED = frozenset({"das"})
"""Measurements whose training-side scores carry a per-example scale (``residual_scale``)."""
if tuple(_REGISTRY) != MEASUREMENTS:  # the config's list of names and this registry agree
    raise RuntimeError("measurement registry and config.MEASUREMENTS disagree")


def get_measurement(name: str) -> Measurement:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown measurement {name!r}; choose one of {', '.join(_REGISTRY)}"
        ) from None
