"""Tracked layers and parameter groups: which gradients are featurized and how they split.

A tracked layer is an ``nn.Linear`` or ``nn.Conv2d`` of the denoiser (or, on a model whose
text encoder carries LoRA adapters, of those adapters, named ``text_encoder.<module>``: their
own group under the block and function presets) selected by glob patterns over module names
(``*`` matches dots too). Its weight (and bias) gradient is
projected to ``k_out x k_in`` numbers. Layers are grouped by a preset or by custom patterns;
the flat feature vector is the concatenation of groups in a fixed order (by first module
appearance), each group the concatenation of its layers in module order. The layout is
written into every manifest so any stage can slice one group out of a flat vector.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from attribution_core.config import GroupConfig, ProjectionConfig
from attribution_core.errors import ConfigError
from attribution_core.models.lora import is_adapter_layer, target_name

# Ordered (group, patterns) rules of the 'function' preset: the first match wins.
FUNCTION_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("text_encoder", ("text_encoder.*",)),  # a LoRA text encoder's adapters, when tracked
    ("time_embedding", ("time_embedding.*", "class_embedding.*", "add_embedding.*")),
    ("cross_attn_q", ("*attn2.to_q",)),
    ("cross_attn_k", ("*attn2.to_k",)),
    ("cross_attn_v", ("*attn2.to_v",)),
    ("cross_attn_out", ("*attn2.to_out.*",)),
    ("self_attn_qkv", ("*attn1.to_q", "*attn1.to_k", "*attn1.to_v",
                       "*attentions.*.to_q", "*attentions.*.to_k", "*attentions.*.to_v")),
    ("self_attn_out", ("*attn1.to_out.*", "*attentions.*.to_out.*")),
    ("feed_forward", ("*.ff.*",)),
    ("attn_proj", ("*attentions.*.proj_in", "*attentions.*.proj_out")),
    ("resnet_time_proj", ("*resnets.*.time_emb_proj",)),
    ("resnet_conv", ("*resnets.*.conv1", "*resnets.*.conv2", "*resnets.*.conv_shortcut")),
    ("resample", ("*downsamplers.*", "*upsamplers.*")),
    ("io", ("conv_in", "conv_out")),
)

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class TrackedLayer:
    """One projected layer: ``G`` is ``fan_out x fan_in`` (bias as the last input column)."""

    name: str
    kind: str  # "linear" | "conv2d"
    fan_in: int  # in_features, or in_channels * kh * kw; plus 1 when the layer has a bias
    fan_out: int
    has_bias: bool
    group: str
    offset: int  # start of this layer's k_out * k_in block in the flat feature vector
    dim: int


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    name: str
    offset: int
    dim: int
    layers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """Groups in their fixed order with offsets into the flat feature vector."""

    groups: tuple[GroupSpec, ...]
    layers: tuple[TrackedLayer, ...]
    k_in: int
    k_out: int

    @property
    def k_total(self) -> int:
        return sum(g.dim for g in self.groups)

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def group(self, name: str) -> GroupSpec:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; groups are {', '.join(self.group_names)}")

    def to_manifest(self) -> dict[str, Any]:
        return {
            "k_in": self.k_in,
            "k_out": self.k_out,
            "k_total": self.k_total,
            "groups": [
                {"name": g.name, "offset": g.offset, "dim": g.dim, "layers": list(g.layers)}
                for g in self.groups
            ],
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> GroupLayout:
        return cls(
            groups=tuple(
                GroupSpec(g["name"], g["offset"], g["dim"], tuple(g["layers"])) for g in data["groups"]
            ),
            layers=tuple(TrackedLayer(**layer) for layer in data["layers"]),
            k_in=data["k_in"],
            k_out=data["k_out"],
        )


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a pattern matches the module name or, for a LoRA part, its target's name."""
    names = {name, target_name(name)}
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def candidate_layers(model: nn.Module, lora_only: bool = True) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` by qualified name, in module order;
    on a model with LoRA adapters and ``lora_only``, the adapters' projections alone."""
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name
    }
    if lora_only and any(is_adapter_layer(name) for name in layers):
        layers = {name: module for name, module in layers.items() if is_adapter_layer(name)}
    return layers


def _block_group(name: str) -> str:
    if name.startswith("text_encoder."):
        return "text_encoder"
    m = _BLOCK.match(name)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    if name.startswith("mid_block."):
        return "mid_block"
    return "other"


def _rules_group(rules: tuple[tuple[str, tuple[str, ...]], ...]) -> Callable[[str], str]:
    def assign(name: str) -> str:
        for group, patterns in rules:
            if _matches(name, patterns):
                return group
        return "other"

    return assign


def _assigner(cfg: GroupConfig) -> Callable[[str], str]:
    if cfg.preset == "layer":
        return lambda name: name
    if cfg.preset == "block":
        assign = _block_group
    elif cfg.preset == "function":
        assign = _rules_group(FUNCTION_RULES)
    else:
        assign = _rules_group(cfg.custom)
    return lambda name: assign(target_name(name))  # a LoRA part goes where its target would


def _unmatched_pattern_error(setting: str, pattern: str, names: list[str]) -> ConfigError:
    sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return ConfigError(
        f"{setting}: pattern {pattern!r} matches no Linear/Conv2d layer of the model "
        f"(layer names look like: {sample}); fix or remove the pattern"
    )


def _layer_shape(name: str, module: nn.Module) -> tuple[str, int, int, bool]:
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        return "linear", module.in_features + has_bias, module.out_features, has_bias
    if module.groups != 1:
        raise ConfigError(
            f"layer {name!r} is a grouped convolution (groups={module.groups}), which the "
            "Kronecker-factored projection does not handle; add it to groups.exclude"
        )
    kh, kw = module.kernel_size
    return "conv2d", module.in_channels * kh * kw + has_bias, module.out_channels, has_bias


def build_layout(model: nn.Module, groups: GroupConfig, projection: ProjectionConfig) -> GroupLayout:
    """Select tracked layers of ``model`` and lay out their groups; refuse patterns that match
    nothing, so a typo never silently drops a layer."""
    candidates = candidate_layers(model, groups.lora_only)
    names = list(candidates)
    if not names:
        raise ConfigError(f"{type(model).__name__} has no Linear or Conv2d layer to track")
    for setting, patterns in (("featurize.groups.include", groups.include), ("featurize.groups.exclude", groups.exclude)):
        for p in patterns:
            if not any(_matches(n, (p,)) for n in names):
                raise _unmatched_pattern_error(setting, p, names)
    tracked = [n for n in names if _matches(n, groups.include) and not _matches(n, groups.exclude)]
    if not tracked:
        raise ConfigError("featurize.groups.include/exclude leave no layer tracked; widen groups.include")
    for group, patterns in groups.custom:
        for p in patterns:
            if not any(_matches(n, (p,)) for n in tracked):
                raise _unmatched_pattern_error(f"featurize.groups.custom.{group}", p, tracked)

    assign = _assigner(groups)
    members: dict[str, list[str]] = {}
    for name in tracked:  # dict keeps first-appearance order of groups
        members.setdefault(assign(name), []).append(name)

    dim = projection.dim_per_layer
    layers: list[TrackedLayer] = []
    specs: list[GroupSpec] = []
    offset = 0
    for group, layer_names in members.items():
        start = offset
        for name in layer_names:
            kind, fan_in, fan_out, has_bias = _layer_shape(name, candidates[name])
            layers.append(TrackedLayer(name=name, kind=kind, fan_in=fan_in, fan_out=fan_out, has_bias=has_bias,
                                       group=group, offset=offset, dim=dim))
            offset += dim
        specs.append(GroupSpec(group, start, offset - start, tuple(layer_names)))
    return GroupLayout(tuple(specs), tuple(layers), projection.k_in, projection.k_out)
