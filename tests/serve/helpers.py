"""What the serving tests share: prompts, streaming, and the checks that
follow every case."""

from __future__ import annotations

from kvpolicy.eval.evaluate import NeedleSpec, chat_ids
from kvpolicy.eval.haystack import haystack_text
from kvpolicy.sglang_ext.server import invariant_problems

__all__ = ["LISBON", "HangUp", "assert_healthy", "assert_packed", "chat_ids", "hang_up_after", "hay",
           "stream_completion"]

# A needle the 135M model retrieves from EMS's 10% cache at this length and
# depth (its 7-digit numbers lose their digits when merged: README § Results).
LISBON = NeedleSpec("Mary's favourite city is Lisbon.", "What is Mary's favourite city?", "Lisbon")


def assert_packed(event: dict, policy, prompt_len: int) -> None:
    """A ``compressed`` event holds what the policy plans for this prompt:
    each layer keeps ``H_kv * min(B_l, N)`` rows (per-head budgets of a
    layer sum to that), and the prompt holds ``ceil(rows / (L * H_kv))``
    slots -- the packing overhead is under one slot."""
    from kvpolicy.exec.pipeline import compile_pipeline
    from kvpolicy.lang.budgets import DEFAULT_MODEL as shape

    budgets = compile_pipeline(policy, shape, prompt_len).plan.layer_budgets
    rows = [shape.num_kv_heads * min(b, prompt_len) for b in budgets]
    assert event["rows_per_layer"] == rows, (event["rows_per_layer"], rows)
    assert event["slots_kept"] == -(-sum(rows) // (shape.num_layers * shape.num_kv_heads))
    if len(set(rows)) > 1:  # layers keep different numbers of tokens
        assert event["layout"] == "rows"
    elif policy.selection.unit != "pooled" and policy.selection.keep.p is None:  # every head keeps B_l
        assert event["layout"] == "rank-slot"


def hay(tokenizer, n: int, offset: int = 0) -> str:
    ids = tokenizer.encode(haystack_text(), add_special_tokens=False)
    return tokenizer.decode(ids[offset:offset + n])


def stream_completion(server, prompt_ids, max_tokens, on_chunk=None, **extra):
    """OpenAI ``/v1/completions`` with ``stream=True``; returns the text."""
    text = []
    for n, chunk in enumerate(server.completion_chunks(prompt_ids, max_tokens, **extra), start=1):
        text.append(chunk["choices"][0].get("text") or "")
        if on_chunk is not None:
            on_chunk(n)
    return "".join(text)


class HangUp(Exception):
    """Raised from a stream's callback: the client hangs up."""


def hang_up_after(n):
    def on_chunk(seen):
        if seen >= n:
            raise HangUp
    return on_chunk


def assert_healthy(server, tokenizer) -> dict:
    """The invariants after a case: once every request has ended no slot,
    record or capture is held; the radix tree's accounting is consistent and
    it holds no compressed KV (:func:`invariant_problems`); after a flush the
    allocator's free count is the whole pool again; and the server still
    answers a fresh request correctly. Returns the idle state."""
    idle = server.wait_idle()
    assert not invariant_problems(idle, idle=True), (invariant_problems(idle, idle=True), idle)
    server.flush_cache()
    flushed = server.wait_idle()
    assert flushed["available_slots"] == flushed["max_total_num_tokens"], flushed
    assert flushed["invariants"]["tree_slots"] == 0, flushed
    reply = server.generate(chat_ids(tokenizer, "What is the capital of France? One word."), 8)
    assert "Paris" in reply.get("text", ""), reply
    return idle
