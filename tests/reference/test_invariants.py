"""Invariants of every shipped policy on random tensors (policy x layer matrix:
a new policy costs one line in SHIPPED)."""

from __future__ import annotations

import pytest
import torch

import kvpolicy as kp
from kvpolicy.exec.pipeline import compile_pipeline
from kvpolicy.lang.budgets import ModelShape
from tests.conftest import heads_artifact, layers_artifact
from tests.dsl.test_roundtrip import SHIPPED

SHAPE = ModelShape(num_layers=4, num_kv_heads=2, num_q_heads=6, name="tiny-test")
N, D = 400, 16


@pytest.fixture
def artifacts(tmp_path, write_json, monkeypatch):
    """The tiny model's own calibration artifacts, for compresskv."""
    write_json("tiny-test.heads.json", heads_artifact(num_layers=4, num_heads=6, model="tiny-test"))
    write_json("tiny-test.layers.json", layers_artifact([0.4, 0.3, 0.2, 0.1], model="tiny-test"))
    monkeypatch.setenv("KVPOLICY_ARTIFACTS", str(tmp_path))


def run(policy, seed=0):
    torch.manual_seed(seed)
    pipe = compile_pipeline(policy, SHAPE, N)
    q, k, v = torch.randn(6, N, D), torch.randn(2, N, D), torch.randn(2, N, D)
    return pipe, [pipe.compress(layer, pipe.capture(q, k, v)) for layer in range(SHAPE.num_layers)], k, v


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("budget", [64, "10%"])
def test_invariants(name, budget, artifacts):
    policy = kp.load(name) if name == "full" else kp.load(name).with_budget(budget)
    pipe, layers, k, v = run(policy)
    protected = list(range(policy.protect.sink)) + list(range(N - policy.protect.recent, N))
    for layer, out in enumerate(layers):
        B = pipe.plan.layer_budgets[layer]
        H_kv, K, d = out.keys.shape
        assert (H_kv, d) == (2, D) and out.values.shape == out.keys.shape and out.positions.shape == (2, K)
        sel = policy.selection
        if sel is not None and sel.unit == "pooled":
            assert int(out.counts.sum()) == 2 * B  # heads differ, the layer's total is exact
        else:
            assert out.counts.tolist() == [B, B]  # every head keeps exactly its budget
        for h in range(H_kv):
            kh, vh, pos = out.head(h)
            assert pos.tolist() == sorted(set(pos.tolist()))  # distinct, in position order
            assert set(protected) <= set(pos.tolist())  # protected tokens are always kept
            merged = sel is not None and sel.merge is not None
            if not merged:  # kept tokens are the original K/V, bit for bit
                assert torch.equal(kh, k[h, pos]) and torch.equal(vh, v[h, pos])
            assert int(out.counts[h] + out.merged[h] + out.evicted[h]) == N
    # deterministic
    _, again, _, _ = run(policy)
    for a, b in zip(layers, again, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.positions, b.positions)


def test_snapkv_keeps_exactly_the_top_scores():
    """Kept (non-protected) tokens are exactly the top-c of the pooled, GQA-averaged window score."""
    from kvpolicy.exec.reference.scores import ScoreContext, evaluate
    from kvpolicy.exec.reference.select import protected_mask

    policy = kp.snapkv(budget=64)
    pipe, layers, k, v = run(policy, seed=5)
    torch.manual_seed(5)
    q = torch.randn(6, N, D)
    inputs = pipe.capture(q, torch.randn(2, N, D), torch.randn(2, N, D))
    cand = ~protected_mask(N, policy.protect)
    s = evaluate(policy.score("s"), ScoreContext(inputs, 3, cand))
    for h in range(2):
        picked = set(layers[0].head(h)[2].tolist()) - set(range(N - 32, N))
        top = set(s[h].masked_fill(~cand, float("-inf")).topk(64 - 32).indices.tolist())
        assert picked == top


def test_compresskv_heads_of_a_layer_keep_the_same_tokens(artifacts):
    _, layers, _, _ = run(kp.load("compresskv").with_budget(64))
    for out in layers:
        assert torch.equal(out.positions[0], out.positions[1])


def test_ems_merges_and_evicts_per_head(artifacts):
    # correlated keys and values (ems merges on cos(K) * cos(V)) so that some
    # not-kept tokens are similar to kept ones
    torch.manual_seed(2)
    k, v = (torch.randn(2, 8, D).repeat_interleave(N // 8, dim=1) + 0.05 * torch.randn(2, N, D) for _ in range(2))
    policy = kp.ems(budget=96)
    pipe = compile_pipeline(policy, SHAPE, N)
    out = pipe.compress(0, pipe.capture(torch.randn(6, N, D), k, v))
    assert out.counts.tolist() == [96, 96]
    assert (out.merged > 0).all() and (out.evicted > 0).all()
    assert out.rank_slot()[0].shape == (2, 96, D)
