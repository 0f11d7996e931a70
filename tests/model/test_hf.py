"""The transformers path: policies applied to a real model's generation."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the transformers path needs transformers (installed by `make test`)")

import kvpolicy as kp  # noqa: E402
from kvpolicy.hf.generate import generate  # noqa: E402
from tests.model.tiny import tiny_llama  # noqa: E402


def prompt(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, n), generator=g)


def test_full_cache_is_token_identical_to_transformers_generate():
    lm, tok, shape = tiny_llama()
    ids = prompt(0, 50)
    ref = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                      pad_token_id=tok.eos_token_id)[0, 50:]
    for policy in (None, kp.full(), kp.snapkv(budget=256)):  # the last never compresses a 50-token prompt
        out, _ = generate(lm, ids, policy, shape, max_new_tokens=12)
        assert out[0].tolist() == ref.tolist()


@pytest.mark.parametrize("policy", [None, kp.snapkv(budget=48), kp.adakv(budget=48), kp.ems(budget=40),
                                    kp.pyramidkv(budget=48)], ids=["full", "snapkv", "adakv", "ems", "pyramidkv"])
def test_left_padded_batch_equals_one_by_one(policy):
    lm, tok, shape = tiny_llama()
    a, b = prompt(1, 120), prompt(2, 90)
    batch = torch.full((2, 120), 0)
    batch[0] = a[0]
    batch[1, 30:] = b[0]
    mask = torch.ones(2, 120, dtype=torch.long)
    mask[1, :30] = 0
    out, state = generate(lm, batch, policy, shape, attention_mask=mask, max_new_tokens=8)
    for row, single in ((0, a), (1, b)):
        alone, _ = generate(lm, single, policy, shape, max_new_tokens=8)
        assert out[row].tolist() == alone[0].tolist()
    assert state.positions.tolist() == [120 + 8 - 1, 90 + 8 - 1]  # logical positions, not physical lengths


def test_compressed_cache_holds_the_budget():
    lm, tok, shape = tiny_llama()
    _, state = generate(lm, prompt(3, 200), kp.snapkv(budget=64), shape, max_new_tokens=1)
    assert state.kept[0] == [64 * shape.num_kv_heads] * shape.num_layers


def test_context_only_mode_feeds_the_question_after_compression():
    lm, tok, shape = tiny_llama()
    ctx, question = prompt(4, 150), prompt(5, 10)
    full_ids = torch.cat([ctx, question], dim=1)
    ref, _ = generate(lm, full_ids, None, shape, max_new_tokens=6)
    out, _ = generate(lm, ctx, None, shape, question_ids=question, max_new_tokens=6)
    assert out.tolist() == ref.tolist()  # with the full cache both modes agree
    out, state = generate(lm, ctx, kp.snapkv(budget=64), shape, question_ids=question, max_new_tokens=6)
    assert state.valid[0].shape[2] == 64 + 10 + 5  # compressed context, then question and answer tokens


def test_decode_time_trigger_keeps_the_cache_near_its_budget():
    lm, tok, shape = tiny_llama()
    policy = kp.snapkv(budget=64).with_trigger(prefill=True, decode_every=8)
    _, state = generate(lm, prompt(6, 200), policy, shape, max_new_tokens=30)
    for valid in state.valid:
        counts = valid[0].sum(dim=1)
        assert int(counts.max()) <= 64 + 8  # recompressed to 64 every 8 tokens


@pytest.mark.parametrize("arch", ["llama-mha", "qwen2", "mistral"])
def test_other_families_and_mha(arch):
    import transformers

    from kvpolicy.hf.models import shape_of

    torch.manual_seed(0)
    common = dict(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=4096)
    if arch == "llama-mha":
        lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=4, **common))
    elif arch == "qwen2":
        lm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **common))
    else:
        lm = transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, sliding_window=None,
                                                                        **common))
    lm.eval().config._attn_implementation = "sdpa"
    shape = shape_of(lm, arch)
    ids = prompt(7, 120)
    ref = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
    out, _ = generate(lm, ids, None, shape, max_new_tokens=6)
    assert out[0].tolist() == ref[0, 120:].tolist()
    out, state = generate(lm, ids, kp.snapkv(budget=48), shape, max_new_tokens=6)
    assert state.kept[0] == [48 * shape.num_kv_heads] * 2


def test_prefill_computes_accumulated_attention_in_the_attention_pass():
    from kvpolicy.exec.reference.attention import accumulated_attention
    from kvpolicy.hf.generate import prefill

    lm, tok, shape = tiny_llama()
    batch = torch.zeros(2, 80, dtype=torch.long)
    batch[0] = prompt(8, 80)[0]
    batch[1, 20:] = prompt(9, 60)[0]
    mask = torch.ones_like(batch)
    mask[1, :20] = 0
    plain = prefill(lm, batch, mask)
    fused = prefill(lm, batch, mask, window=4, accumulate=True)
    torch.testing.assert_close(fused.last_logits, plain.last_logits, rtol=1e-4, atol=1e-4)
    q_full = prefill(lm, batch[:1], window=80)  # all 80 queries of sequence 0, layer 1
    expected = accumulated_attention(q_full.queries[0][1], q_full.keys[0][1], 2)
    torch.testing.assert_close(fused.accumulated[0][1], expected, rtol=1e-4, atol=1e-5)
    assert fused.accumulated[1][0].shape == (4, 60)  # left padding removed


@pytest.mark.parametrize("policy, why", [
    (kp.h2o(budget=64).with_trigger(decode_every=8), "global()"),
    (kp.adakv(budget=64).with_trigger(decode_every=8), "per head pooled"),
])
def test_a_decode_trigger_that_cannot_run_exactly_is_refused(policy, why):
    """The server's rule too (compiler.decode_trigger_limit): refused, with the reason, never skipped."""
    lm, tok, shape = tiny_llama()
    with pytest.raises(kp.PolicyError, match="cannot recompress during decoding") as err:
        generate(lm, prompt(2, 120), policy, shape, max_new_tokens=4)
    assert why in str(err.value)


def test_a_prompt_under_budget_is_compressed_once_its_generation_crosses_it():
    """64 tokens kept: a 40-token prompt keeps all of it at prefill; after 8, 16
    and 24 decoded tokens the check runs; from 32 on (40 + 24 = 64 ... + 32 =
    72 > 64) it holds the budget. ``trigger every`` without ``prefill``
    leaves a long prompt exact at prefill and compresses it at the first check."""
    lm, tok, shape = tiny_llama()
    policy = kp.snapkv(budget=64).with_trigger(prefill=True, decode_every=8)
    _, state = generate(lm, prompt(4, 40), policy, shape, max_new_tokens=40)
    counts = [int(valid[0].sum(dim=1).max()) for valid in state.valid]
    assert max(counts) <= 64 + 8 and min(counts) >= 64  # compressed to 64, not to the 40-token prompt
    late = kp.snapkv(budget=64).with_trigger(prefill=False, decode_every=8)
    _, exact = generate(lm, prompt(5, 200), late, shape, max_new_tokens=4)
    assert int(exact.valid[0][0].sum(dim=1).max()) == 200 + 3  # no check yet: the prompt is whole
    _, later = generate(lm, prompt(5, 200), late, shape, max_new_tokens=12)
    assert int(later.valid[0][0].sum(dim=1).max()) <= 64 + 8


def test_rkv_holds_a_long_generation_near_its_budget():
    lm, tok, shape = tiny_llama()
    policy = kp.rkv(budget=64, every=16)
    _, state = generate(lm, prompt(6, 100), policy, shape, max_new_tokens=70)
    for valid in state.valid:
        assert int(valid[0].sum(dim=1).max()) <= 64 + 16
