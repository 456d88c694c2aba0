"""Parameter groups: presets, custom patterns, stable order and offsets."""

from __future__ import annotations

import pytest

from attribution_core.config import GroupConfig, ProjectionConfig
from attribution_core.errors import ConfigError
from attribution_core.features.groups import GroupLayout, build_layout, candidate_layers

PROJ = ProjectionConfig(k_in=3, k_out=2)


def _assert_contiguous(layout: GroupLayout) -> None:
    offset = 0
    for g in layout.groups:
        assert g.offset == offset
        layers = [ly for ly in layout.layers if ly.group == g.name]
        assert [ly.name for ly in layers] == list(g.layers)
        for ly in layers:
            assert ly.offset == offset and ly.dim == 6
            offset += ly.dim
        assert g.dim == 6 * len(layers)
    assert layout.k_total == offset


def test_block_preset(adapters):
    unet = adapters["text"].denoiser
    layout = build_layout(unet, GroupConfig(preset="block"), PROJ)
    # Order of first appearance in named_modules (diffusers registers mid_block last).
    assert layout.group_names == ("other", "down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1", "mid_block")
    assert layout.group("other").layers[:3] == ("conv_in", "time_embedding.linear_1", "time_embedding.linear_2")
    assert len(layout.layers) == len(candidate_layers(unet))
    _assert_contiguous(layout)


def test_layer_preset_one_group_per_module(adapters):
    unet = adapters["unet"].denoiser
    layout = build_layout(unet, GroupConfig(preset="layer"), PROJ)
    assert [g.name for g in layout.groups] == list(candidate_layers(unet))
    _assert_contiguous(layout)


def test_function_preset(adapters):
    layout = build_layout(adapters["text"].denoiser, GroupConfig(preset="function"), PROJ)
    group_of = {ly.name: ly.group for ly in layout.layers}
    name = "down_blocks.1.attentions.0.transformer_blocks.0"
    assert group_of[f"{name}.attn2.to_q"] == "cross_attn_q"
    assert group_of[f"{name}.attn2.to_k"] == "cross_attn_k"
    assert group_of[f"{name}.attn2.to_v"] == "cross_attn_v"
    assert group_of[f"{name}.attn1.to_k"] == "self_attn_qkv"
    assert group_of[f"{name}.attn1.to_out.0"] == "self_attn_out"
    assert group_of["time_embedding.linear_1"] == "time_embedding"
    assert group_of["down_blocks.0.resnets.0.conv1"] == "resnet_conv"
    assert group_of["down_blocks.0.resnets.0.time_emb_proj"] == "resnet_time_proj"
    assert group_of["conv_in"] == "io"
    assert "other" not in layout.group_names, [n for n, g in group_of.items() if g == "other"]
    _assert_contiguous(layout)


def test_custom_groups_include_exclude_and_manifest_round_trip(adapters):
    cfg = GroupConfig(
        preset="custom",
        include=("*attn*", "conv_in"),
        exclude=("*to_out*",),
        custom=(("cross", ("*attn2*",)), ("self", ("*attn1*",))),
    )
    layout = build_layout(adapters["text"].denoiser, cfg, PROJ)
    assert layout.group_names == ("other", "self", "cross")  # order of first appearance
    assert not any("to_out" in ly.name for ly in layout.layers)
    assert layout.group("other").layers == ("conv_in",)
    assert GroupLayout.from_manifest(layout.to_manifest()) == layout
    _assert_contiguous(layout)


def test_layout_is_stable_across_builds(adapters):
    a = build_layout(adapters["text-latent"].denoiser, GroupConfig(preset="function"), PROJ)
    b = build_layout(adapters["text-latent"].denoiser, GroupConfig(preset="function"), PROJ)
    assert a.to_manifest() == b.to_manifest()


def test_everything_excluded(adapters):
    with pytest.raises(ConfigError, match="leave no layer tracked"):
        build_layout(adapters["unet"].denoiser, GroupConfig(include=("conv_in",), exclude=("conv_in",)), PROJ)
