"""Hooks into a Hugging Face transformers model's attention.

:func:`tap_attention` swaps in an attention function of ours for the duration
of a ``with`` block, through transformers' own ``AttentionInterface`` registry
(no monkeypatching of model code). The function sees each layer's queries
after RoPE and the full keys/values (cache included), which is what capture,
calibration and compression need.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from kvpolicy.compile.compiler import decode_trigger_limit
from kvpolicy.exec.pipeline import Pipeline, backend_for, compile_pipeline
from kvpolicy.exec.reference.scores import LayerInputs
from kvpolicy.lang import ir
from kvpolicy.lang.budgets import ModelShape
from kvpolicy.lang.errors import PolicyError

TAP_NAME = "kvpolicy_tap"
_active: list[Callable] = []  # the innermost tap is called


def _dispatch(module, *args, **kwargs):
    return _active[-1](module, *args, **kwargs)


def base_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The attention the model would compute (SDPA), ``[B, q, H, d]`` out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@contextmanager
def tap_attention(model, fn: Callable):
    """While active, every attention layer calls ``fn(module, query, key, value,
    attention_mask, scaling, **kwargs)`` (query ``[B, H, q, d]`` after RoPE,
    key/value ``[B, H_kv, kv, d]``); ``fn`` returns what the attention would
    (``(out [B, q, H, d], weights or None)``), e.g. by calling :func:`base_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    # registered once, under one name: a tap per decode step must not grow the registries
    if TAP_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(TAP_NAME, _dispatch)
        ALL_MASK_ATTENTION_FUNCTIONS.register(TAP_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.config._attn_implementation = TAP_NAME
    _active.append(fn)
    try:
        yield
    finally:
        _active.pop()
        model.config._attn_implementation = previous


@dataclass
class Capture:
    """What one prefill left behind, per sequence and layer: real tokens only
    (left padding removed). Reusable: several policies can compress the same
    capture (the evaluation prefills once per prompt)."""

    lengths: list[int]  # real prompt tokens per sequence
    keys: list[list[torch.Tensor]]  # [seq][layer] -> [H_kv, n, d]
    values: list[list[torch.Tensor]]
    queries: list[list[torch.Tensor]]  # [seq][layer] -> [H, W, d], the last W prompt queries
    accumulated: list[list[torch.Tensor | None]]  # [seq][layer] -> [H, n]
    last_logits: torch.Tensor  # [B, V] at each sequence's last prompt token

    def inputs(self, b: int, layer: int) -> LayerInputs:
        return LayerInputs(self.keys[b][layer], self.values[b][layer], self.queries[b][layer],
                           self.accumulated[b][layer])


def capture_needs(policies, shape: ModelShape, prompt_len: int) -> tuple[int, bool]:
    """What a prefill must capture so that every one of ``policies`` can
    compress from it: the longest observation window, and whether any scores
    with accumulated attention."""
    window, accumulate = 0, False
    for policy in policies:
        if policy is not None and policy.selection is not None:
            pipe = compile_pipeline(policy, shape, max(prompt_len, 1))
            window, accumulate = max(window, pipe.window), accumulate or pipe.needs_accumulated
    return window, accumulate


@torch.no_grad()
def prefill(lm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
            window: int = 0, accumulate: bool = False) -> Capture:
    """Run the prompt once (left padding allowed) and capture per layer the
    keys/values, the last ``window`` queries and, if asked, the attention
    accumulated over all queries (block by block, never N x N)."""
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    lengths = [int(n) for n in mask.sum(dim=1)]
    L = lm.config.num_hidden_layers
    keys = [[None] * L for _ in range(B)]
    values = [[None] * L for _ in range(B)]
    queries = [[None] * L for _ in range(B)]
    acc = [[None] * L for _ in range(B)]

    def tap(module, query, key, value, attn_mask, scaling, **kw):
        layer = module.layer_idx
        n_rep = query.shape[1] // key.shape[1]
        for b, n in enumerate(lengths):
            keys[b][layer] = key[b, :, T - n:].clone()
            values[b][layer] = value[b, :, T - n:].clone()
            queries[b][layer] = query[b, :, T - min(window, n):].clone() if window else None
        if not accumulate:
            return base_attention(module, query, key, value, attn_mask, scaling, **kw)
        # one pass gives the layer's output and the accumulated attention
        out = torch.zeros(B, T, query.shape[1], value.shape[-1], dtype=query.dtype, device=query.device)
        attention_with_column_sums = backend_for(query.device).attention_with_column_sums
        for b, n in enumerate(lengths):
            o, acc[b][layer] = attention_with_column_sums(query[b, :, T - n:], key[b, :, T - n:],
                                                          value[b, :, T - n:], n_rep, scale=scaling)
            out[b, T - n:] = o.transpose(0, 1).to(query.dtype)
        return out, None

    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    with tap_attention(lm, tap):
        out = lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    return Capture(lengths, keys, values, queries, acc, out.logits[:, -1].float())


@dataclass
class CompressedState:
    """A batch's cache after compression, and how to extend it.

    Per layer: keys/values ``[B, H_kv, K, d]`` (sequences padded to the longest),
    ``valid [B, H_kv, K]`` which slots hold a token. New tokens are appended
    to every sequence; ``positions`` are the logical positions the next token
    of each sequence takes (for RoPE), independent of the physical lengths.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: list[torch.Tensor]
    positions: torch.Tensor  # [B]
    kept: list[list[int]]  # [seq][layer] slots kept per KV head, summed over heads
    pipelines: list[Pipeline | None] = field(default_factory=list)
    window_queries: list[list[torch.Tensor | None]] = field(default_factory=list)  # decode-trigger buffer
    tracks_window: bool = False  # a decode-time trigger is set: decode steps keep the last window queries
    since_compress: int = 0


def compress(capture: Capture, policy: ir.Policy | None, shape: ModelShape) -> CompressedState:
    """Apply ``policy`` (``None``: keep everything) to each sequence of a
    capture; a policy whose trigger leaves out ``prefill`` keeps everything
    now and compresses only during decoding. A decode trigger that cannot be
    run exactly is refused (:func:`~kvpolicy.compile.compiler.decode_trigger_limit`,
    the server's rule too)."""
    if policy is not None and (why := decode_trigger_limit(policy)):
        raise PolicyError(f"policy '{policy.name}' cannot recompress during decoding: {why}", file=policy.source)
    B, L = len(capture.lengths), shape.num_layers
    per_layer_k: list[list[torch.Tensor]] = [[None] * B for _ in range(L)]
    per_layer_v: list[list[torch.Tensor]] = [[None] * B for _ in range(L)]
    per_layer_valid: list[list[torch.Tensor]] = [[None] * B for _ in range(L)]
    kept, pipes = [], []
    for b, n in enumerate(capture.lengths):
        pipe = compile_pipeline(policy, shape, n) if policy is not None and policy.selection is not None else None
        pipes.append(pipe)
        row = []
        for layer in range(L):
            if pipe is None or not pipe.policy.trigger.prefill:
                k, v = capture.keys[b][layer], capture.values[b][layer]
                valid = torch.ones(k.shape[:2], dtype=torch.bool)
            else:
                out = pipe.compress(layer, capture.inputs(b, layer))
                k, v, valid = out.keys, out.values, out.positions >= 0
            per_layer_k[layer][b], per_layer_v[layer][b], per_layer_valid[layer][b] = k, v, valid
            row.append(int(valid.sum()))
        kept.append(row)
    keys, values, valids = [], [], []
    for layer in range(L):
        K = max(k.shape[1] for k in per_layer_k[layer])
        keys.append(torch.stack([_pad(k, K) for k in per_layer_k[layer]]))
        values.append(torch.stack([_pad(v, K) for v in per_layer_v[layer]]))
        valids.append(torch.stack([_pad(m, K) for m in per_layer_valid[layer]]))
    positions = torch.tensor(capture.lengths)
    window = [[capture.queries[b][layer] for layer in range(L)] for b in range(B)]
    tracks = any(p is not None and p.policy.trigger.decode_every for p in pipes)
    return CompressedState(keys, values, valids, positions, kept, pipes, window, tracks)


def stack_states(states: list[CompressedState]) -> CompressedState:
    """One batch of several compressed caches of the same prompt length (e.g.
    one prompt under many policies), each layer padded to its longest, so they
    decode together: a greedy decode of the batch gives each sequence what it
    gives alone (padding is masked; float sums may differ in the last bits)."""
    if len({int(p) for s in states for p in s.positions}) > 1 or len({s.since_compress for s in states}) > 1:
        raise ValueError("stack_states: the caches must be at the same position")
    keys, values, valids = [], [], []
    for layer in range(len(states[0].keys)):
        K = max(s.keys[layer].shape[2] for s in states)
        for out, field_of in ((keys, "keys"), (values, "values"), (valids, "valid")):
            out.append(torch.cat([_pad(getattr(s, field_of)[layer], K, dim=2) for s in states]))
    return CompressedState(keys, values, valids, torch.cat([s.positions for s in states]),
                           [row for s in states for row in s.kept], [p for s in states for p in s.pipelines],
                           [w for s in states for w in s.window_queries], any(s.tracks_window for s in states),
                           states[0].since_compress)


def _pad(x: torch.Tensor, K: int, dim: int = 1) -> torch.Tensor:
    """``x`` zero-padded along ``dim`` to length ``K``."""
    if x.shape[dim] == K:
        return x
    pad = [0, 0] * (x.dim() - dim - 1) + [0, K - x.shape[dim]]
    return torch.nn.functional.pad(x, pad)


@torch.no_grad()
def feed(lm, state: CompressedState, tokens: torch.Tensor) -> torch.Tensor:
    """Append ``tokens [B, q]`` to every sequence of the compressed cache and
    return their logits ``[B, q, V]``. Attention sees each sequence's valid
    slots plus the new tokens causally; RoPE uses the logical positions."""
    Bsz, q = tokens.shape
    n_rep = lm.config.num_attention_heads // lm.config.num_key_value_heads
    positions = state.positions[:, None] + torch.arange(q)[None, :]
    causal = torch.ones(q, q, dtype=torch.bool).tril()

    def tap(module, query, key, value, attn_mask, scaling, **kw):
        layer = module.layer_idx
        k = torch.cat([state.keys[layer], key], dim=2)
        v = torch.cat([state.values[layer], value], dim=2)
        K = state.keys[layer].shape[2]
        old = state.valid[layer].repeat_interleave(n_rep, dim=1)[:, :, None, :].expand(Bsz, -1, q, K)
        new = causal[None, None].expand(Bsz, old.shape[1], q, q)
        allowed = torch.cat([old, new], dim=-1)
        mask = torch.zeros(allowed.shape, dtype=query.dtype).masked_fill(~allowed, float("-inf"))
        state.keys[layer], state.values[layer] = k, v
        state.valid[layer] = torch.cat([state.valid[layer], torch.ones(Bsz, key.shape[1], q, dtype=torch.bool)], dim=2)
        if state.tracks_window:
            for b in range(Bsz):
                w = state.window_queries[b][layer]
                if w is not None:
                    state.window_queries[b][layer] = torch.cat([w, query[b]], dim=1)[:, -w.shape[1]:]
        # SDPA over the KV heads as they are (enable_gqa): the same result bit for
        # bit as transformers' SDPA, which repeats K and V for every query head
        # when a mask is given -- a copy of the whole cache per layer and step
        out = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling,
                                                               enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    with tap_attention(lm, tap):
        logits = lm(input_ids=tokens, position_ids=positions, use_cache=False).logits
    state.positions = state.positions + q
    state.since_compress += q
    _maybe_recompress(state)
    return logits.float()


def _maybe_recompress(state: CompressedState) -> None:
    """The decode-time trigger: every ``N`` decoded tokens, a sequence whose
    cache is over its budget is compressed again to that budget (its kept
    slots and the tokens decoded since, scored by the policy's terms over
    the last window queries, prompt and decode steps alike). Policies this
    cannot run exactly were refused by :func:`compress`."""
    todo = [(b, p) for b, p in enumerate(state.pipelines)
            if p is not None and p.policy.trigger.decode_every and state.since_compress >= p.policy.trigger.decode_every]
    if not todo:
        return
    for b, pipe in todo:
        for layer in range(len(state.keys)):
            valid = state.valid[layer][b]  # [H_kv, K]
            budget = pipe.plan.decode_budgets[layer]
            counts = valid.sum(dim=1)
            if int(counts.min()) <= budget:
                continue
            if not bool((counts == counts[0]).all()):  # refused in compress (decode_trigger_limit)
                raise RuntimeError(f"layer {layer}: heads of unequal length {counts.tolist()} at a recompression")
            k = state.keys[layer][b][valid].view(valid.shape[0], -1, state.keys[layer].shape[-1])
            v = state.values[layer][b][valid].view(valid.shape[0], -1, state.values[layer].shape[-1])
            out = pipe.compress(layer, LayerInputs(k, v, state.window_queries[b][layer]), budget=budget)
            K = state.keys[layer].shape[2]
            state.keys[layer][b] = _pad(out.keys, K)
            state.values[layer][b] = _pad(out.values, K)
            state.valid[layer][b] = _pad(out.positions >= 0, K)
    state.since_compress = 0


@torch.no_grad()
def generate(lm, input_ids: torch.Tensor, policy: ir.Policy | None, shape: ModelShape, *,
             attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
             eos_token_id: int | None = None, question_ids: torch.Tensor | None = None):
    """Greedy generation with ``policy`` applied after prefill (and at decode
    time if its trigger says so). ``question_ids [B, q]``, if given, are fed
    after compression, before generating (context-only evaluation).
    Returns ``(new token ids [B, <= max_new_tokens], state)``."""
    window, accumulate = capture_needs([policy], shape, int(input_ids.shape[1]))
    cap = prefill(lm, input_ids, attention_mask, window=window, accumulate=accumulate)
    state = compress(cap, policy, shape)
    logits = cap.last_logits
    if question_ids is not None:
        logits = feed(lm, state, question_ids)[:, -1]
    return decode(lm, state, logits, max_new_tokens, eos_token_id), state


def decode(lm, state: CompressedState, logits: torch.Tensor, max_new_tokens: int, eos_token_id: int | None):
    """Greedy decoding from ``logits [B, V]`` (of the last fed token)."""
    out = []
    done = torch.zeros(logits.shape[0], dtype=torch.bool)
    for step in range(max_new_tokens):
        y = logits.argmax(dim=-1)
        if eos_token_id is not None:
            y = torch.where(done, torch.full_like(y, eos_token_id), y)
            done |= y == eos_token_id
        out.append(y)
        if bool(done.all()) or step == max_new_tokens - 1:
            break  # the last token is returned, never fed
        logits = feed(lm, state, y[:, None])[:, -1]
    return torch.stack(out, dim=1) if out else torch.zeros(logits.shape[0], 0, dtype=torch.long)
