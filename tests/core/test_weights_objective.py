"""The pooled weight objective against the paper's full cache, and the pool machinery."""

from __future__ import annotations

import numpy as np
import torch

from attribution_core.index.kernel import kernel_from_gram
from attribution_core.weights.objective import (contributions, full_cache_objective, group_queries,
                                                pooled_objective, weights_from_theta)
from attribution_core.weights.pools import (ScanState, extend_pools, merge, mining_weightings,
                                            pools_from_state, scan_block)
from attribution_core.weights.synthetic import synthetic_index, synthetic_layout, synthetic_queries

LAYOUT = synthetic_layout(groups=5, dim=8)
N, Q, K, R = 300, 12, 5, 40


def scan(grouped, index, weightings, r, with_noise=True, block=64):
    state = ScanState.empty(grouped.shape[0], weightings.shape[0], len(LAYOUT.groups), with_noise)
    for i in range(0, index.shape[0], block):
        ids = [str(j) for j in range(i, min(i + block, index.shape[0]))]
        state = scan_block(state, grouped, weightings, index[i : i + block], ids=ids, r=r)
    return state


def setup(kernel: bool):
    index = synthetic_index(N, LAYOUT, seed=1)
    queries, _ = synthetic_queries(N, Q, LAYOUT, signal=(1, 3), seed=1)
    blocks = None
    if kernel:
        x = index.double()
        k, _ = kernel_from_gram((x.T @ x).numpy(), 0.05)
        blocks = [(0, LAYOUT.k_total, torch.from_numpy(k))]
    return index, queries, group_queries(queries, LAYOUT, blocks)


def test_pooled_objective_and_gradient_equal_the_full_cache():
    for kernel in (False, True):
        index, _, grouped = setup(kernel)
        cache = contributions(grouped, index).double()  # [Q, N, M]: the paper's cache
        state = scan(grouped, index, mining_weightings(len(LAYOUT.groups)), R)
        pools = pools_from_state(state)
        # The noise moments equal the cache's, i.e. q'^T C q' for q' = K (w . g(q)).
        np.testing.assert_allclose(state.noise, torch.einsum("qnm,qnk->qmk", cache, cache), rtol=1e-5)
        for seed in range(3):
            theta = torch.randn(len(LAYOUT.groups), generator=torch.Generator().manual_seed(seed), requires_grad=True)
            pooled = pooled_objective(theta, pools.contrib, pools.valid, state.noise, k=K, lambda_w=0.01)
            (g_pooled,) = torch.autograd.grad(pooled, theta)
            full = full_cache_objective(theta, cache, K, 0.01)
            (g_full,) = torch.autograd.grad(full, theta)
            # The pools hold each query's top-k under this w (checked by a rescan below).
            found = scan(grouped, index, weights_from_theta(theta.detach())[None], K, with_noise=False)
            assert extend_pools(pools, found)[1] == [1.0] * Q
            torch.testing.assert_close(pooled, full, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(g_pooled, g_full, rtol=1e-4, atol=1e-7)


def test_split_scans_merge_to_the_whole_scan():
    index, _, grouped = setup(False)
    w = mining_weightings(len(LAYOUT.groups))
    whole = scan(grouped, index, w, R)
    a = scan(grouped, index[:100], w, R)
    b = ScanState.empty(Q, w.shape[0], len(LAYOUT.groups), True)
    b = scan_block(b, grouped, w, index[100:], ids=[str(j) for j in range(100, N)], r=R)
    merged = merge(a, b, R)
    torch.testing.assert_close(merged.scores, whole.scores)
    assert (merged.ids == whole.ids).all()
    torch.testing.assert_close(merged.noise, whole.noise)


def test_extend_pools_adds_the_missing_top_k_and_reports_recall():
    index, _, grouped = setup(False)
    uniform_only = scan(grouped, index, mining_weightings(len(LAYOUT.groups))[:1], K)  # tiny pools: R = k
    pools = pools_from_state(uniform_only)
    w = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0])  # the signal groups only: another top-k
    found = scan(grouped, index, w[None], K, with_noise=False)
    grown, recall = extend_pools(pools, found)
    assert min(recall) < 1.0  # the uniform pool missed some of the true top-k
    _, again = extend_pools(grown, found)
    assert again == [1.0] * Q
    assert all(s >= K for s in grown.sizes)


def test_attribute_scores_are_the_objectives_tau_for_every_weighting_at_once():
    from attribution_core.index.scoring import attribute

    for kernel in (False, True):
        index, queries, grouped = setup(kernel)
        blocks = None
        if kernel:
            x = index.double()
            k, _ = kernel_from_gram((x.T @ x).numpy(), 0.05)
            blocks = [(0, LAYOUT.k_total, torch.from_numpy(k))]
        w = torch.stack([torch.full((5,), 0.2), torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0]), torch.eye(5)[2]])
        scores, idx = attribute(queries, w, LAYOUT, blocks, blocks=(index[i : i + 70] for i in range(0, N, 70)), k=K)
        tau = torch.einsum("qnm,am->aqn", contributions(grouped, index).double(), w.double())  # [A, Q, N]
        ref = torch.topk(tau, K, dim=2)
        torch.testing.assert_close(scores.double(), ref.values, rtol=1e-4, atol=1e-5)
        assert (idx == ref.indices).float().mean() > 0.99  # ties aside, the same examples
