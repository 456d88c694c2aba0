"""Weighted scores and exact streamed top-k against plain references."""

from __future__ import annotations

import pytest
import torch

from attribution_core.config import GroupConfig, ProjectionConfig
from attribution_core.errors import InputError
from attribution_core.features.groups import build_layout
from attribution_core.index.scoring import (expand_weights, group_inner_products, streaming_topk, topk_reference,
                                      weighted_scores)


@pytest.fixture(scope="module")
def layout(adapters):
    return build_layout(adapters["unet"].denoiser, GroupConfig(preset="block"), ProjectionConfig(k_in=2, k_out=2))


def test_weighted_scores_equal_sum_of_weighted_group_products(layout):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, layout.k_total, generator=g, dtype=torch.float64)
    x = torch.randn(40, layout.k_total, generator=g, dtype=torch.float64)
    w = torch.rand(3, len(layout.groups), generator=g, dtype=torch.float64)
    per_group = group_inner_products(q, x, layout)  # [Q, N, M]
    expected = torch.einsum("qnm,am->aqn", per_group, w)
    torch.testing.assert_close(weighted_scores(q, x, w, layout), expected)
    # Uniform weights give the plain inner product.
    torch.testing.assert_close(weighted_scores(q, x, torch.ones(len(layout.groups), dtype=torch.float64), layout)[0],
                               q @ x.T)


@pytest.mark.parametrize("block", [1, 7, 64, 1000])
@pytest.mark.parametrize("k", [1, 5, 50])
def test_streaming_topk_equals_argsort(block, k):
    g = torch.Generator().manual_seed(block * 100 + k)
    q = torch.randn(4, 16, generator=g)
    x = torch.randn(300, 16, generator=g)
    values, index = streaming_topk(q, (x[i : i + block] for i in range(0, 300, block)), k)
    ref_v, ref_i = topk_reference(q @ x.T, k)
    torch.testing.assert_close(values, ref_v)
    assert torch.equal(index, ref_i)


def test_streaming_topk_with_fewer_rows_than_k_and_ties():
    q = torch.ones(1, 2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    values, index = streaming_topk(q, [x[:2], x[2:]], 10)
    assert values.tolist() == [[2.0, 1.0, 1.0]]
    assert index[0, 0].item() == 2 and sorted(index[0, 1:].tolist()) == [0, 1]


def test_bad_arguments(layout):
    with pytest.raises(InputError, match="k must be >= 1"):
        streaming_topk(torch.ones(1, 2), [torch.ones(3, 2)], 0)
    with pytest.raises(InputError, match="groups"):
        expand_weights(torch.ones(1, len(layout.groups) + 1), layout)
