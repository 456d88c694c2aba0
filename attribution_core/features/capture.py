"""Fast path: Kronecker-factored projection of per-example gradients, captured with hooks.

For a tracked layer with inputs ``a_t`` and output gradients ``d_t`` at positions t (tokens,
or conv output pixels with ``a_t`` the unfolded input patch), one example's weight gradient
is ``G = sum_t d_t a_t^T`` (``fan_out x fan_in``; a bias is the input column of ones).
Its projection factorises (LoGra, Choe et al. 2024):

    P_out G P_in^T = sum_t (P_out d_t)(P_in a_t)^T          Tensor[k_out, k_in]

so a forward hook stores ``P_in a_t`` and a tensor hook on the layer output forms
``P_out d_t`` and the outer-product sum per example. No per-example gradient is ever
materialised and the parameters need no ``.grad`` (they are frozen, so autograd skips the
weight-gradient GEMMs). Rows are example-major (``R = B * rows_per_example``) and the rows
of one example are summed, which is the gradient of the example's mean measurement.

A layer whose input does not depend on the noisy sample (the time-embedding MLP,
cross-attention k/v on text states) produces an output that does not require grad once the
parameters are frozen; the forward hook then returns that output as a leaf that requires
grad, so its gradient still arrives (nothing upstream needs differentiating).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from attribution_core.errors import ConfigError
from attribution_core.features.groups import GroupLayout, TrackedLayer
from attribution_core.seeding import projection_matrix


class KroneckerCapture:
    """Holds the projections of every tracked layer and accumulates projected gradients."""

    def __init__(self, model: nn.Module, layout: GroupLayout, seed: int, device: torch.device) -> None:
        modules = dict(model.named_modules())
        self.layout = layout
        self.layers: list[tuple[TrackedLayer, nn.Module]] = [(ly, modules[ly.name]) for ly in layout.layers]
        # P_in: [k_in, fan_in], P_out: [k_out, fan_out], regenerated from (seed, layer name).
        self.p_in = {
            ly.name: projection_matrix(seed, ly.name, "in", layout.k_in, cols=ly.fan_in).to(device)
            for ly in layout.layers
        }
        self.p_out = {
            ly.name: projection_matrix(seed, ly.name, "out", layout.k_out, cols=ly.fan_out).to(device)
            for ly in layout.layers
        }
        self._conv_kernels = {
            ly.name: self._conv_kernel(ly, module) for ly, module in self.layers if ly.kind == "conv2d"
        }
        self._acc: dict[str, torch.Tensor] = {}
        self._examples = 0
        self._rows_per_example = 0
        self._per_row = False

    def _conv_kernel(self, layer: TrackedLayer, conv: nn.Conv2d) -> torch.Tensor:
        # P_in[:, :C*kh*kw] as a conv weight [k_in, C, kh, kw]; unfold order is (C, kh, kw).
        width = layer.fan_in - layer.has_bias
        return self.p_in[layer.name][:, :width].reshape(self.layout.k_in, conv.in_channels, *conv.kernel_size)

    # ------------------------------------------------------------------ input projection
    def _project_input(self, layer: TrackedLayer, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """``P_in a_t``: Linear -> ``[R, S, k_in]``; Conv2d -> ``[R, k_in, P]`` (P output pixels)."""
        p_in = self.p_in[layer.name]
        bias = p_in[:, -1] if layer.has_bias else None  # the constant-1 input column
        a = a.float()
        if layer.kind == "linear":
            weight = p_in[:, : module.in_features]
            # Project before reshaping: a may be a strided view, and only the small result is copied.
            return F.linear(a, weight, bias).reshape(a.shape[0], -1, weight.shape[0])  # [R, S, k_in]
        if module.padding_mode != "zeros":
            a = F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode)
            padding = 0
        else:
            padding = module.padding
        out = F.conv2d(a, self._conv_kernels[layer.name], bias, stride=module.stride, padding=padding,
                       dilation=module.dilation)
        return out.flatten(2)  # [R, k_in, H', W'] -> [R, k_in, P]

    def _accumulate(self, layer: TrackedLayer, a_proj: torch.Tensor, grad: torch.Tensor) -> None:
        # Per example (rows summed) or, with per_row, per row: b "units" of r rows each.
        b, r = (self._examples * self._rows_per_example, 1) if self._per_row else (self._examples, self._rows_per_example)
        p_out = self.p_out[layer.name]
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.float()
            if layer.kind == "linear":
                d_proj = grad @ p_out.T  # [R, ..., k_out] without copying a strided grad
                d_ex = d_proj.reshape(b, -1, d_proj.shape[-1])  # [b, r*S, k_out]
                a_ex = a_proj.reshape(b, -1, a_proj.shape[-1])  # [b, r*S, k_in]
                g = d_ex.transpose(1, 2) @ a_ex  # [b, k_out, k_in]
            else:
                d_proj = p_out @ grad.flatten(2)  # [k_out, O] @ [R, O, P] -> [R, k_out, P]
                g_rows = d_proj @ a_proj.transpose(1, 2)  # [R, k_out, k_in]
                g = g_rows.reshape(b, r, *g_rows.shape[1:]).sum(1)  # [b, k_out, k_in]
        prev = self._acc.get(layer.name)
        self._acc[layer.name] = g if prev is None else prev + g  # a module called twice adds up

    def _hook(self, layer: TrackedLayer):
        def forward_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor):
            rows = self._examples * self._rows_per_example
            if inputs[0].shape[0] != rows:
                raise ConfigError(
                    f"layer {layer.name!r} saw a leading dimension of {inputs[0].shape[0]}, not the "
                    f"{rows} rows of the batch; it mixes examples and cannot be featurized per "
                    "example: add it to featurize.groups.exclude"
                )
            with torch.no_grad(), torch.autocast(output.device.type, enabled=False):
                a_proj = self._project_input(layer, module, inputs[0].detach())
            replaced = None
            if not output.requires_grad:
                output = replaced = output.detach().requires_grad_(True)
            output.register_hook(lambda grad: self._accumulate(layer, a_proj, grad))
            return replaced

        return forward_hook

    @contextlib.contextmanager
    def capturing(self, examples: int, rows_per_example: int, per_row: bool = False) -> Iterator[None]:
        """Hooks installed for one forward/backward over ``examples * rows_per_example`` rows;
        ``per_row`` keeps each row's projected gradient instead of each example's sum."""
        self._acc = {}
        self._examples, self._rows_per_example, self._per_row = examples, rows_per_example, per_row
        handles = [module.register_forward_hook(self._hook(layer)) for layer, module in self.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def collect(self) -> torch.Tensor:
        """Projected gradients ``Tensor[B, k_total]`` (``Tensor[B * rows_per_example, k_total]``
        when capturing per row; float32) in the layout's order; a layer that never received a
        gradient (unused for this input) contributes zeros."""
        b = self._examples * self._rows_per_example if self._per_row else self._examples
        device = next(iter(self.p_in.values())).device
        flat = torch.zeros(b, self.layout.k_total, dtype=torch.float32, device=device)
        for layer in self.layout.layers:
            g = self._acc.get(layer.name)
            if g is not None:
                flat[:, layer.offset : layer.offset + layer.dim] = g.reshape(b, -1)
        self._acc = {}
        return flat
