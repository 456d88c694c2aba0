"""Measurement functions: the scalar output of the diffusion model whose gradient is featurized.

A measurement maps the denoiser output of each (example, timestep, noise) row to one number;
an example's measurement is the mean over its rows (averaged over T timesteps and the noise
draws, as in TRAK / D-TRAK for diffusion models).

- ``loss``: the denoising objective ``mean((eps_theta(x_t, t, c) - target)^2)``, used by
  TRAK and TracIn (Park et al. 2023; Pruthi et al. 2020).
- ``square``: ``mean(eps_theta(x_t, t, c)^2)``, the squared norm of the output, which
  D-TRAK (Zheng et al. 2024) found to attribute better than the loss.
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


def contrast_measurement(output: torch.Tensor, without: torch.Tensor) -> torch.Tensor:
    """Concept-TRAK's query measurement (arXiv 2507.06547): ``mean(eps_c * sg(eps_c - eps_c-))``
    with ``eps_c`` the output under the full prompt and ``without`` (``eps_c-``) the output
    under the prompt without the concept. Its gradient is ``J_c^T (eps_c - eps_c-) / d``:
    the direction in which the concept moves the prediction, in place of D-TRAK's
    ``J^T eps``. [R, ...] x [R, ...] -> [R]."""
    out = output.float()
    return (out * (out.detach() - without.float())).flatten(1).mean(1)


_REGISTRY: dict[str, Measurement] = {"loss": loss_measurement, "square": square_measurement}
if tuple(_REGISTRY) != MEASUREMENTS:  # the config's list of names and this registry agree
    raise RuntimeError("measurement registry and config.MEASUREMENTS disagree")


def get_measurement(name: str) -> Measurement:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown measurement {name!r}; choose one of {', '.join(_REGISTRY)}"
        ) from None
