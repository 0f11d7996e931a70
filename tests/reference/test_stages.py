"""Hand-computed cases for each stage of the reference executor."""

from __future__ import annotations

import math

import pytest
import torch

import kvpolicy as kp
from kvpolicy.exec.pipeline import compile_pipeline
from kvpolicy.exec.reference import attention, merge, select
from kvpolicy.exec.reference.scores import LayerInputs, ScoreContext, evaluate, pool_tokens, to_kv_heads
from kvpolicy.lang import ir
from kvpolicy.lang.budgets import ModelShape


def naive_attention(q, k, n_rep):
    """Full causal softmax attention probabilities ``[H, N, N]`` (test only)."""
    H, N, d = q.shape
    k = k.repeat_interleave(n_rep, 0)
    logits = q @ k.transpose(1, 2) / math.sqrt(d)
    logits = logits.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1)


@pytest.mark.parametrize("N, block", [(7, 3), (33, 8), (40, 256)])
def test_accumulated_attention_equals_the_full_matrix_sum(N, block):
    torch.manual_seed(N)
    q, k = torch.randn(6, N, 8), torch.randn(2, N, 8)
    full = naive_attention(q, k, 3).sum(1)
    torch.testing.assert_close(attention.accumulated_attention(q, k, 3, block=block), full)


def test_window_attention_is_the_last_rows_of_the_full_matrix():
    torch.manual_seed(1)
    q, k = torch.randn(4, 20, 8), torch.randn(4, 20, 8)
    full = naive_attention(q, k, 1)
    torch.testing.assert_close(attention.window_attention(q[:, -5:], k, 1), full[:, -5:])
    torch.testing.assert_close(attention.window_attention(q[:, -5:], k, 1, window=2), full[:, -2:])


def test_snapkv_pooling_on_ten_tokens():
    raw = torch.tensor([[0.0, 0, 0, 5, 0, 0, 0, 0, 0, 10]])
    # avg kernel 5, zero padding counted: token 1 sees (0+0+0+0+5)/5 = 1, token 3 sees 5/5, ...
    assert pool_tokens(raw, ir.Pool("avg", 5)).tolist() == [[0, 1, 1, 1, 1, 1, 0, 2, 2, 2]]
    assert pool_tokens(raw, ir.Pool("max", 3)).tolist() == [[0, 0, 5, 5, 5, 0, 0, 0, 10, 10]]


def test_gqa_groups_are_h_floordiv_n_rep():
    # query heads 0,1,2 -> KV head 0; 3,4,5 -> KV head 1 (not the interleaved h % H_kv)
    s = torch.tensor([[1.0], [2.0], [3.0], [10.0], [20.0], [30.0]])
    ctx = ScoreContext(LayerInputs(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4)), 3, torch.ones(1, dtype=torch.bool))
    assert to_kv_heads(s, ir.LocalAttention(1), ctx).tolist() == [[2.0], [20.0]]
    assert to_kv_heads(s, ir.LocalAttention(1, gqa="max"), ctx).tolist() == [[3.0], [30.0]]


def test_retrieval_heads_vote_and_every_kv_head_shares_the_vote():
    s = torch.zeros(6, 5)
    s[4, 2] = 6.0  # the planted retrieval head 4 looks at token 2
    s[0, 0] = 100.0  # a non-retrieval head's opinion is ignored
    heads = ir.RetrievalHeads(top=2)
    ctx = ScoreContext(LayerInputs(torch.zeros(2, 5, 4), torch.zeros(2, 5, 4)), 3, torch.ones(5, dtype=torch.bool),
                       {heads: (4, 1)})
    assert to_kv_heads(s, ir.LocalAttention(1, heads=heads), ctx).tolist() == [[0, 0, 3, 0, 0]] * 2


def test_global_mean_divides_by_the_queries_that_see_each_key():
    acc = torch.tensor([[4.0, 3.0, 2.0, 1.0]])  # N=4: key j is seen by 4-j queries
    ctx = ScoreContext(LayerInputs(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), accumulated=acc), 1,
                       torch.ones(4, dtype=torch.bool))
    assert evaluate(ir.GlobalAttention(norm="mean"), ctx).tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert evaluate(ir.GlobalAttention(), ctx).tolist() == [[4.0, 3.0, 2.0, 1.0]]


def test_global_uniform_divides_by_the_causally_expected_attention():
    # N=4, each query i spreads evenly over its i+1 keys: key 3 expects 1/4,
    # key 2 1/3 + 1/4, key 1 1/2 + 1/3 + 1/4, key 0 1 + 1/2 + 1/3 + 1/4
    expected = [25 / 12, 13 / 12, 7 / 12, 3 / 12]
    acc = torch.tensor([expected]) * torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    ctx = ScoreContext(LayerInputs(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2), accumulated=acc), 1,
                       torch.ones(4, dtype=torch.bool))
    torch.testing.assert_close(evaluate(ir.GlobalAttention(norm="uniform"), ctx), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))


def test_max_align_keeps_the_larger_aligned_score():
    # a has mean 2 over the candidates; b (mean 20) aligned to it is b / 10 = [3, 1, 2, 0.5]
    a = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    b = torch.tensor([[30.0, 10.0, 20.0, 5.0]])
    cand = torch.tensor([True, True, True, False])
    ctx = ScoreContext(LayerInputs(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2)), 1, cand, named={"a": a, "b": b})
    out = evaluate(ir.Normalize("max_align", (ir.ScoreRef("a"), ir.ScoreRef("b"))), ctx)
    torch.testing.assert_close(out, torch.tensor([[3.0, 2.0, 3.0, 100.0]]))


def test_normalisers_use_candidate_statistics():
    a = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    cand = torch.tensor([True, True, True, False])
    ctx = ScoreContext(LayerInputs(torch.zeros(1, 4, 2), torch.zeros(1, 4, 2)), 1, cand,
                       named={"a": a, "b": a * 10})
    z = evaluate(ir.Normalize("zscore", (ir.ScoreRef("a"),)), ctx)
    torch.testing.assert_close(z[0, :3], torch.tensor([-1.2247449, 0.0, 1.2247449]))
    assert evaluate(ir.Normalize("rank", (ir.ScoreRef("a"),)), ctx).tolist() == [[0.0, 0.5, 1.0, 0.0]]
    # b is 10x a: aligned to a's mean (2) it becomes a, and the sum is 2a
    torch.testing.assert_close(evaluate(ir.Normalize("mean_align", (ir.ScoreRef("a"), ir.ScoreRef("b"))), ctx), 2 * a)


def test_adakv_pooled_allocation_by_hand():
    # 2 heads, c = 4 picks each, safeguard 0.25 -> each head first gets its top 1;
    # the other 2 * 3 = 6 go to the best remaining scores of either head:
    # 8, 7, 6, 5 (head 0) and then 0.2, 0.2 (head 1 beats head 0's 0.1)
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 0.1, 0.1, 0.1],
                           [3.0, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]])
    cand = torch.ones(8, dtype=torch.bool)
    picks = select.pick(ir.Selection("pooled", ir.KeepTop("s"), safeguard=0.25), scores, cand, 4)
    assert picks.counts.tolist() == [5, 3]
    assert picks.order[0, :5].tolist() == [0, 1, 2, 3, 4]
    assert picks.order[1, :3].tolist() == [0, 1, 2]  # ties broken by position
    # safeguard 1.0 is plain per-head selection
    even = select.pick(ir.Selection("pooled", ir.KeepTop("s"), safeguard=1.0), scores, cand, 4)
    assert even.counts.tolist() == [4, 4]


def test_top_p_stops_once_the_mass_is_covered():
    scores = torch.tensor([[8.0, 1.0, 1.0, 0.0]])
    picks = select.pick(ir.Selection("head", ir.KeepTop("s", p=0.8)), scores, torch.ones(4, dtype=torch.bool), 3)
    assert picks.counts.tolist() == [1]


def test_merge_of_identical_keys_returns_that_key():
    k = torch.tensor([[[3.0, 4.0], [3.0, 4.0], [0.0, 1.0]]])  # token 1 duplicates token 0
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    scores = torch.tensor([[2.0, 1.0, 0.0]])
    kept = torch.tensor([[True, False, False]])
    classes = merge.classify(k, v, scores, kept, kept, ir.MergeSimilar(threshold=0.9), torch.zeros(3, dtype=torch.bool))
    assert classes.class_id.tolist() == [[1, 1, 0]] and classes.merged.tolist() == [1] and classes.evicted.tolist() == [1]
    out_k, out_v = merge.scatter(k, v, classes)
    torch.testing.assert_close(out_k, torch.tensor([[[3.0, 4.0]]]))
    w0, w1 = 2.0 + merge.WEIGHT_FLOOR, 1.0 + merge.WEIGHT_FLOOR  # score weights
    torch.testing.assert_close(out_v, torch.tensor([[[w0 / (w0 + w1), w1 / (w0 + w1)]]]))


def test_kv_similarity_is_the_product_of_key_and_value_cosines():
    """similar(kv, cosine > t): EMS's redundancy cos(K) * cos(V), by hand.
    Centres: tokens 0 and 1 (unit axes, keys = values). Token 2: key along
    token 0, value at 60 degrees to it (products 0.5 with token 0, 0 with 1).
    Token 3: key = value at cos 0.6 / 0.8 to the axes (0.36, 0.64). Token 4:
    key (0.8, 0.6), value (-0.6, 0.8) (0.8 * -0.6 = -0.48 with token 0,
    0.6 * 0.8 = 0.48 with token 1): its key alone picks token 0."""
    k = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.6, 0.8], [0.8, 0.6]]])
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.5, 0.75 ** 0.5], [0.6, 0.8], [-0.6, 0.8]]])
    scores = torch.tensor([[5.0, 4.0, 1.0, 1.0, 1.0]])
    kept = torch.tensor([[True, True, False, False, False]])
    none = torch.zeros(5, dtype=torch.bool)
    by_keys = merge.classify(k, v, scores, kept, kept, ir.MergeSimilar("keys", threshold=0.45), none)
    assert by_keys.class_id.tolist() == [[1, 2, 1, 2, 1]]
    by_kv = merge.classify(k, v, scores, kept, kept, ir.MergeSimilar("kv", threshold=0.45), none)
    assert by_kv.class_id.tolist() == [[1, 2, 1, 2, 2]]
    strict = merge.classify(k, v, scores, kept, kept, ir.MergeSimilar("kv", threshold=0.55), none)
    assert strict.class_id.tolist() == [[1, 2, 0, 2, 0]]  # only 0.64 passes


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
@pytest.mark.parametrize("rows", [1, 7, 256, 10_000])
def test_best_centres_block_by_block_equal_the_whole_product(metric, rows, monkeypatch):
    """The similarity product is taken ``SIMILARITY_ROWS`` tokens at a time;
    blocks that do not divide the tokens and heads with fewer centres (masked
    ones) give the whole ``[H, N, C]`` product's best centre and value."""
    torch.manual_seed(5)
    H, N, C, d = 3, 600, 40, 8
    keys, values = torch.randn(H, N, d), torch.randn(H, N, d)
    ck, cv = torch.randn(H, C, d), torch.randn(H, C, d)
    invalid = torch.zeros(H, C, dtype=torch.bool)
    invalid[1, 30:] = True  # head 1 keeps 30 centres
    whole = merge._similarity(keys, ck, metric) * merge._similarity(values, cv, metric)
    want_sim, want = whole.masked_fill(invalid[:, None, :], float("-inf")).max(dim=-1)
    monkeypatch.setattr(merge, "SIMILARITY_ROWS", rows)
    got_sim, got = merge._best_centres((keys, values), [ck, cv], invalid, metric)
    torch.testing.assert_close(got_sim, want_sim)
    assert torch.equal(got, want) and int(got[1].max()) < 30


def test_zero_class_drops_exactly_the_evicted_tokens():
    torch.manual_seed(3)
    H, N, d = 2, 12, 4
    k, v = torch.randn(H, N, d), torch.randn(H, N, d)
    kept = torch.zeros(H, N, dtype=torch.bool)
    kept[:, [0, 5, 9]] = True
    classes = merge.classify(k, v, torch.rand(H, N), kept, kept, None, torch.zeros(N, dtype=torch.bool))
    assert (classes.class_id[~kept] == 0).all() and classes.evicted.tolist() == [9, 9]
    poisoned = v.clone()
    poisoned[~kept] = 1e30  # whatever an evicted token holds cannot reach the output
    out_k, out_v = merge.scatter(k, poisoned, classes)
    assert torch.equal(out_k, k[:, [0, 5, 9]]) and torch.equal(out_v, v[:, [0, 5, 9]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_without_merged_tokens_gathers_what_the_scatter_gives(dtype):
    """No token merged: the kept tokens are gathered (a head keeping fewer
    slots gets zeros past its count), equal bit for bit to the full scatter,
    which runs when ``merged`` says a token merged."""
    import dataclasses

    torch.manual_seed(4)
    H, N, d = 2, 16, 4
    k, v = torch.randn(H, N, d).to(dtype), torch.randn(H, N, d).to(dtype)
    kept = torch.zeros(H, N, dtype=torch.bool)
    kept[0, [0, 3, 7]] = True
    kept[1, [2, 9]] = True  # one slot fewer
    classes = merge.classify(k, v, torch.rand(H, N), kept, kept, None, torch.zeros(N, dtype=torch.bool))
    assert classes.merged.tolist() == [0, 0]
    out_k, out_v = merge.scatter(k, v, classes)
    assert out_k.dtype == dtype and torch.equal(out_k[1, 2], torch.zeros(d, dtype=dtype))
    assert torch.equal(out_k[0], k[0, [0, 3, 7]]) and torch.equal(out_v[1, :2], v[1, [2, 9]])
    full_k, full_v = merge.scatter(k, v, dataclasses.replace(classes, merged=torch.ones(H, dtype=torch.long)))
    assert torch.equal(out_k, full_k) and torch.equal(out_v, full_v)


def test_cover_lets_a_sparse_head_evict_its_tail():
    k = torch.ones(2, 6, 2)  # all keys identical: everything is similar enough to merge
    scores = torch.tensor([[10.0, 1, 1, 1, 1, 1],      # head 0: dense tail (half the mass outside the centre)
                           [100.0, 0.1, 0.1, 0.1, 0.1, 0.1]])  # head 1: sparse
    kept = torch.zeros(2, 6, dtype=torch.bool)
    kept[:, 0] = True
    m = ir.MergeSimilar(threshold=0.5, cover=0.9)
    classes = merge.classify(k, k, scores, kept, kept, m, torch.zeros(6, dtype=torch.bool))
    # head 0: centre covers 10/15; tokens are added while covered < 0.9*15 = 13.5 -> 4 merge
    assert classes.merged.tolist() == [4, 0]


def test_pipeline_keeps_input_unchanged_when_budget_covers_prompt():
    pipe = compile_pipeline(kp.snapkv(budget=256), ModelShape(2, 1, 1), 100)
    k, v = torch.randn(1, 100, 4), torch.randn(1, 100, 4)
    out = pipe.compress(0, pipe.capture(torch.randn(1, 100, 4), k, v))
    assert torch.equal(out.keys, k) and out.counts.tolist() == [100]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H, H_kv, N, T", [(6, 2, 300, 300), (6, 2, 300, 77), (4, 4, 129, 1), (9, 3, 700, 700)])
def test_the_one_pass_is_sdpa_and_its_column_sums(dtype, H, H_kv, N, T):
    """The prefill's one pass gives SDPA's output (what the model and SGLang's
    torch_native backend compute) to fp32 rounding, for a whole prompt and for
    a chunk that sees earlier keys, in tiles that do not divide the rows; its
    accumulated attention equals the softmax rows summed explicitly."""
    torch.manual_seed(N + T)
    q, k, v = torch.randn(H, T, 16, dtype=dtype), torch.randn(H_kv, N, 16, dtype=dtype), torch.randn(H_kv, N, 16,
                                                                                                      dtype=dtype)
    out, acc = attention.attention_with_column_sums(q, k, v, H // H_kv, block=64, scale=0.3)
    if T == N:
        sdpa = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                                                enable_gqa=H != H_kv, scale=0.3)[0]
    else:  # SGLang's chunk: the chunk's queries at the end of an N-row block
        padded = torch.zeros(H, N, 16, dtype=dtype)
        padded[:, N - T:] = q
        sdpa = torch.nn.functional.scaled_dot_product_attention(padded[None], k[None], v[None], is_causal=True,
                                                                enable_gqa=H != H_kv, scale=0.3)[0, :, N - T:]
    assert out.dtype == torch.float32
    exact = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.to(dtype), sdpa, **exact)
    logits = torch.einsum("htd,hnd->htn", q.float(), k.float().repeat_interleave(H // H_kv, 0)) * 0.3
    future = torch.arange(N)[None, :] > torch.arange(N - T, N)[:, None]
    explicit = logits.masked_fill(future, float("-inf")).softmax(-1).sum(1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(acc, explicit, **tol)
    assert torch.allclose(acc.sum(), torch.tensor(float(H * T)), rtol=1e-3)  # each row sums to one


@pytest.mark.parametrize("block", [1, 7, 16, 64, 200])
def test_the_one_pass_does_not_depend_on_its_tiles(block):
    """Tiles of any number of queries (one, not dividing the rows, more than
    the rows) give the same output and column sums; an empty chunk gives
    zeros."""
    torch.manual_seed(3)
    q, k, v = torch.randn(8, 50, 16), torch.randn(4, 90, 16), torch.randn(4, 90, 16)
    whole = attention.attention_with_column_sums(q, k, v, 2, block=50)
    tiled = attention.attention_with_column_sums(q, k, v, 2, block=block)
    torch.testing.assert_close(tiled[0], whole[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tiled[1], whole[1], rtol=1e-6, atol=1e-6)
    empty_out, empty_acc = attention.attention_with_column_sums(q[:, :0], k, v, 2, block=block)
    assert empty_out.shape == (8, 0, 16) and torch.equal(empty_acc, torch.zeros(8, 90))


def test_accumulated_attention_sums_over_chunks():
    """A chunked prefill adds each chunk's share: the chunks' sums equal the
    whole prompt's accumulated attention."""
    torch.manual_seed(0)
    H, H_kv, N, d = 4, 2, 37, 8
    q, k = torch.randn(H, N, d), torch.randn(H_kv, N, d)
    whole = attention.accumulated_attention(q, k, n_rep=2, block=8)
    chunked = torch.zeros(H, N)
    for start, stop in [(0, 10), (10, 11), (11, 30), (30, 37)]:
        chunked[:, :stop] += attention.accumulated_attention(q[:, start:stop], k[:, :stop], n_rep=2, block=4)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="queries but only"):
        attention.accumulated_attention(q, k[:, :10], n_rep=2)


def test_redundancy_counts_duplicates_but_not_their_most_recent_copy():
    """R-KV's redundancy by hand: keys 0 and 2 are the same direction, 1 and 3
    orthogonal to everything. Row 0's most recent similar key is 2, the kept
    copy: not counted, so row 0 scores like the lone keys; row 2's most
    recent similar key is 0 (the only one): not counted either. A third copy
    (key 4) makes 0, 2 and 4 each count one duplicate."""
    e = torch.eye(4)
    keys = torch.stack([e[0], e[1], 2 * e[0], e[2], e[3]])[None]  # [1, 5, 4]: 0 and 2 alike
    from kvpolicy.exec.reference.scores import redundancy_term

    r = redundancy_term(ir.Redundancy(), keys)
    assert torch.allclose(r, torch.full((1, 5), 0.2))  # every duplicate's one copy is the kept one
    keys3 = torch.stack([e[0], e[1], 2 * e[0], e[2], 3 * e[0]])[None]  # 0, 2, 4 alike
    r3 = redundancy_term(ir.Redundancy(), keys3)
    mean = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]]) / 5  # each counts one of its two copies
    assert torch.allclose(r3, mean.softmax(dim=-1))
    assert r3[0, 0] > r3[0, 1]


@pytest.mark.parametrize("block", [1, 7, 64])
def test_redundancy_block_by_block_equals_the_whole_matrix(block):
    from kvpolicy.exec.reference.scores import redundancy_term

    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 40, 8, generator=g)
    keys[:, 20:30] = keys[:, 0:10] + 0.05 * torch.randn(2, 10, 8, generator=g)  # near-copies
    k = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)
    sim = k @ k.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).zero_()
    for h in range(2):
        for j in range(40):
            similar = (sim[h, j] > 0.5).nonzero()
            if similar.numel():
                sim[h, j, int(similar.max())] = 0.0
    expected = (sim.sum(dim=-1) / 40).softmax(dim=-1)
    assert torch.allclose(redundancy_term(ir.Redundancy(), keys, block=block), expected, atol=1e-6)


def test_local_over_all_heads_runs_the_backends_window_scores():
    """``local()`` over all heads is one call of the backend's
    ``window_scores`` (the Triton kernel on CUDA); retrieval heads vote from
    the window attention's rows instead."""
    import dataclasses

    from kvpolicy.exec.pipeline import REFERENCE
    from kvpolicy.exec.reference.scores import window_scores

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return window_scores(*args, **kwargs)

    backend = dataclasses.replace(REFERENCE, window_scores=spy)
    shape, N = ModelShape(2, 2, 4), 150
    g = torch.Generator().manual_seed(5)
    inputs = LayerInputs(torch.randn(2, N, 16, generator=g), torch.randn(2, N, 16, generator=g),
                         torch.randn(4, 32, 16, generator=g))
    spied = compile_pipeline(kp.snapkv(budget=48), shape, N, backend=backend).compress(0, inputs)
    plain = compile_pipeline(kp.snapkv(budget=48), shape, N, backend=REFERENCE).compress(0, inputs)
    assert len(calls) == 1 and calls[0]["pool"] == ir.Pool("avg", 5) and calls[0]["window"] == 32
    assert torch.equal(spied.positions, plain.positions)
