"""The ``--kv-policy`` server under aborts, memory pressure, prefix sharing,
small chunks and bad input (issue: nothing lost, nothing leaked, nothing
wrong served). After every case :func:`assert_healthy` checks the
invariants; the servers also run SGLang's strict allocator checks and
kvpolicy's own at every step (``server.STRICT_CHECKS``), so a leak or a
compressed slot in the radix tree during a case stops them.

Bigger versions of these cases run in ``bench/load.py`` and
``bench/chunked.py``.
"""

from __future__ import annotations

import time

import pytest
import torch

from kvpolicy.eval.evaluate import niah_prompt
from kvpolicy.lang.registry import load
from kvpolicy.sglang_ext.server import held_slots, invariant_problems

from .conftest import PRESSURE_POOL
from .helpers import LISBON, assert_healthy, assert_packed, chat_ids, hay


def kinds(events, steps=("capture", "compressed", "not_compressed", "released")):
    """The request's steps through prefill compression and release (a decode
    trigger's ``decode_trigger`` / ``recompressed`` events left out)."""
    return [e["event"] for e in events if e["event"] in steps]


# -- aborts ----------------------------------------------------------------------------

# ~900 tokens: four chunks of 256 on the pressure server, EMS with global()
# capture in every chunk; long enough that an abort sent after the first
# chunk's capture lands while the prefill is still running
def long_prompt(tokenizer, offset):
    return chat_ids(tokenizer, hay(tokenizer, 860, offset=offset) + "\n\nWhat is this text about?")


#: decode tokens a request is kept alive for (``ignore_eos``): far more than
#: any test waits for, so it is still decoding when the test acts on it
KEEP_DECODING = 600


def test_cancel_while_queued(ems_server, tokenizer):
    """Cancelled before it reaches the model: no capture, no slot, no trace.
    Four blockers fill the server's four running places (they decode on
    purpose until aborted), so the target stays queued for as long as the
    test needs, whatever the machine's speed."""
    server = ems_server
    exact = {"custom_params": {"kv_policy": "full"}, "ignore_eos": True}
    blockers = []
    for k in range(4):
        rid = f"queued-blocker-{k}"
        ids = chat_ids(tokenizer, hay(tokenizer, 40, offset=30000 + 100 * k) + "\nGo on.")
        blockers.append((rid, server.generate_in_background(ids, KEEP_DECODING, rid, **exact)))
        server.wait_decoded(rid, 1)
    target = server.generate_in_background(long_prompt(tokenizer, 31000), 32, "queued-target")
    state = server.wait_queued("queued-target")
    assert all(rid in state["scheduler"]["running"] for rid, _ in blockers), state["scheduler"]
    server.abort("queued-target")
    reply = target.result()
    assert reply["meta_info"]["finish_reason"]["type"] == "abort", reply
    assert reply["meta_info"]["completion_tokens"] == 0
    assert server.events("queued-target") == []  # a compressible prompt that never reached the model
    for rid, blocker in blockers:
        server.abort(rid)
        assert blocker.result()["meta_info"]["finish_reason"]["type"] == "abort"
    assert_healthy(server, tokenizer)


def test_cancel_during_chunked_prefill(pressure_server, tokenizer):
    """Cancelled between chunks: the partial capture is dropped with the
    request's slots; nothing is compressed."""
    server = pressure_server
    dropped = server.kv_state()["totals"]["captures_dropped"]
    target = server.generate_in_background(long_prompt(tokenizer, 32000), 32, "prefill-target")
    server.wait_for_event("prefill-target", "capture")
    server.abort("prefill-target")
    reply = target.result()
    assert reply["meta_info"]["finish_reason"]["type"] == "abort", reply
    events = server.events("prefill-target")
    assert kinds(events) == ["capture", "released"], events
    assert events[-1]["capturing"] and not events[-1]["compressed"]
    state = assert_healthy(server, tokenizer)
    assert state["totals"]["captures_dropped"] == dropped + 1


@pytest.mark.parametrize("policy", [None, "compresskv"])
@pytest.mark.parametrize("phase", ["right after compression", "during decode"])
def test_cancel_a_compressed_request(pressure_server, tokenizer, phase, policy):
    """Cancelled once compressed: its ``B + t`` private slots go back, the
    exact prompt stays in the tree (evictable), nothing compressed is
    inserted. With the launch policy (EMS, the rank-slot layout) and with
    CompressKV (per-layer budgets, the row layout)."""
    server = pressure_server
    rid = "cancel-" + phase.replace(" ", "-") + f"-{policy}"
    ids = long_prompt(tokenizer, (33000 if phase == "during decode" else 34000) + (500 if policy else 0))
    params = {"custom_params": {"kv_policy": policy}} if policy else {}
    target = server.generate_in_background(ids, KEEP_DECODING, rid, ignore_eos=True, **params)
    events = server.wait_for_event(rid, "compressed")
    state = server.wait_decoded(rid, 8) if phase == "during decode" else server.kv_state()
    assert not invariant_problems(state), invariant_problems(state)
    assert state["invariants"]["compressed_slots"] >= events[-1]["slots_kept"]
    assert_packed(events[-1], load(policy or server.args[-1]), len(ids))
    if phase == "during decode":  # what it holds: its packed prompt and the tokens it decoded, nothing more
        decoded = state["scheduler"]["running"][rid]
        assert events[-1]["slots_kept"] <= held_slots(state) <= events[-1]["slots_kept"] + decoded + 1
    server.abort(rid)
    reply = target.result()
    assert reply["meta_info"]["finish_reason"]["type"] == "abort", reply
    events = server.events(rid)
    assert kinds(events) == ["capture", "compressed", "released"], events
    released = events[-1]
    assert released["compressed"] and released["finished"]
    assert 1 <= released["output_tokens"] < KEEP_DECODING
    if phase == "during decode":
        assert released["output_tokens"] >= 8
    assert_healthy(server, tokenizer)


# -- memory pressure ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["snapkv", "compresskv", "rkv"])
def test_retracted_compressed_request_is_rebuilt(pressure_server, tokenizer, model_dir, policy):
    """A 1024-slot pool: two exact requests (A, B) and a compressed one (C)
    decode until the pool is full. SGLang evicts the radix tree, then
    retracts the request with the fewest tokens out: C. C is prefilled again
    (prompt + the tokens it had) and compressed again from scratch, and its
    tokens before and after equal the transformers path's, compressed the
    same way at each point. C runs SnapKV (the rank-slot layout),
    CompressKV (per-layer budgets, the row layout) or R-KV (a decode trigger:
    recompressed every 128 decoded tokens; its window and counts start again
    with the rebuilt prompt)."""
    from kvpolicy.hf import generate as hf
    from kvpolicy.hf.models import load_model

    server = pressure_server
    server.flush_cache()
    retracted = server.kv_state()["totals"]["compressed_retracted"]
    # Z sits in the radix tree first; the pressure must evict it
    z = chat_ids(tokenizer, hay(tokenizer, 280, offset=40000) + "\n\nName the topic.")
    z_first = server.generate(z, 4, custom_params={"kv_policy": "full"})

    full = {"custom_params": {"kv_policy": "full"}, "ignore_eos": True}
    a_ids, b_ids = (chat_ids(tokenizer, hay(tokenizer, 180, offset=off) + "\nGo on.") for off in (41000, 42000))
    a = server.generate_in_background(a_ids, 300, "press-A", **full)
    b = server.generate_in_background(b_ids, 300, "press-B", **full)
    # SGLang retracts the request with the fewest tokens generated first: C
    # starts once A and B have 8 each, and all three then decode in step
    server.wait_decoded("press-A", 8)
    server.wait_decoded("press-B", 8)
    c_ids = chat_ids(tokenizer, hay(tokenizer, 420, offset=43000) + "\n\nWhat is this text about?")
    c_rid = f"press-C-{policy}"
    c = server.generate_in_background(c_ids, 300, c_rid, custom_params={"kv_policy": policy, "kv_budget": "64"},
                                      ignore_eos=True)
    seen_problems = []
    while c.alive():
        state = server.kv_state()
        seen_problems += invariant_problems(state)
        time.sleep(1)
    replies = [x.result() for x in (a, b, c)]
    assert not seen_problems, seen_problems
    for reply, n in zip(replies, (300, 300, 300)):
        assert reply["meta_info"]["completion_tokens"] == n, reply["meta_info"]

    c_reply = replies[2]
    assert c_reply["meta_info"]["num_retractions"] >= 1, c_reply["meta_info"]
    events = server.events(c_rid)
    steps = [e for e in events if e["event"] in ("capture", "compressed", "released")]
    assert kinds(steps)[:3] == ["capture", "compressed", "released"], events
    assert not steps[2]["finished"] and steps[2]["compressed"]  # retracted while compressed
    last_capture = [e for e in events if e["event"] == "capture"][-1]
    assert kinds(steps)[-3:] == ["capture", "compressed", "released"] and steps[-1]["finished"], events
    t_r = last_capture["prompt_tokens"] - len(c_ids)  # tokens it had when last retracted
    assert 0 < t_r < 300
    chosen = load(policy).with_budget("64")
    assert steps[-2]["prompt_tokens"] == len(c_ids) + t_r
    assert_packed(steps[-2], chosen, len(c_ids) + t_r)
    assert server.kv_state()["totals"]["compressed_retracted"] > retracted

    out = c_reply["output_ids"]
    lm, _, shape = load_model(str(model_dir))
    k = min(16, steps[2]["output_tokens"])
    before, _ = hf.generate(lm, torch.tensor([c_ids]), chosen, shape, max_new_tokens=k)
    assert out[:k] == before[0].tolist()
    k = min(16, 300 - t_r)
    after, _ = hf.generate(lm, torch.tensor([c_ids + out[:t_r]]), chosen, shape, max_new_tokens=k)
    assert out[t_r:t_r + k] == after[0].tolist()

    # Z was evicted from the tree under the pressure, and is still served exactly
    z_again = server.generate(z, 4, custom_params={"kv_policy": "full"})
    assert z_again["meta_info"]["cached_tokens"] < len(z) - 1
    assert z_again["text"] == z_first["text"]
    assert_healthy(server, tokenizer)


# -- prefix sharing ----------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_sampling_and_a_shared_prefix(plain_server, ems_server, tokenizer):
    """n = 3 samples of one prompt, then four requests sharing a long prefix,
    two compressed (EMS, rank-slot; CompressKV, row layout) and two exact:
    each compressed request has its own slots,
    none in the tree, and the exact ones answer as a server without policy."""
    server = ems_server
    context = hay(tokenizer, 1200, offset=50000)
    prompt = chat_ids(tokenizer, context + "\n\nWhat is this text about?")
    seen_before = {e["rid"] for e in server.kv_state()["events"]}

    # the samples decode on purpose (ignore_eos) until two of them, compressed,
    # are seen decoding side by side, then are aborted
    samples = server.generate_in_background(prompt, KEEP_DECODING, None, temperature=0.8, n=3, ignore_eos=True)
    state = server.wait_until(lambda s: len(s["running"]) >= 2 or not samples.alive(),
                              "two compressed samples decoding side by side")
    assert len(state["running"]) >= 2, state["running"]  # compressed requests decoding side by side
    problems = invariant_problems(state)
    server.abort_all()  # the samples' rids are SGLang's own; nothing else runs on this server now
    replies = samples.result()
    assert isinstance(replies, list) and len(replies) == 3, replies
    assert all(r["meta_info"]["finish_reason"]["type"] == "abort" for r in replies), replies
    compressed = [e for e in server.kv_state()["events"] if e["event"] == "compressed" and e["rid"] not in seen_before]
    assert len({e["rid"] for e in compressed if e["prompt_tokens"] == len(prompt)}) == 3, compressed

    questions = ["Name one keyword.", "Is it fiction?", "Who is the author?", "Give it a title."]
    custom = [None, {"kv_policy": "full"}, {"kv_policy": "compresskv"}, {"kv_policy": "full"}]
    jobs = []
    for i, (q, cp) in enumerate(zip(questions, custom)):
        params = {"custom_params": cp} if cp else {}
        ids = chat_ids(tokenizer, context + "\n\n" + q)
        jobs.append(server.generate_in_background(ids, 16, f"shared-{i}", **params))
    while any(j.alive() for j in jobs):  # invariants sampled while they run (strict checks run every step)
        problems += invariant_problems(server.kv_state())
        time.sleep(0.2)
    answers = [j.result() for j in jobs]
    assert not problems, problems
    for i in (1, 3):  # exact, from the shared prefix in the tree
        ids = chat_ids(tokenizer, context + "\n\n" + questions[i])
        assert answers[i]["meta_info"]["cached_tokens"] > 1000
        assert answers[i]["text"] == plain_server.generate(ids, 16)["text"]
    for i in (0, 2):
        assert [e["event"] for e in server.events(f"shared-{i}")] == ["capture", "compressed", "released"]
    assert_healthy(server, tokenizer)


# -- chunked prefill ---------------------------------------------------------------------


def test_chunks_of_256_equal_one_chunk(ems_server, pressure_server, tokenizer):
    """The same policy (EMS 10%, global() and local() scores) on a ~900-token
    needle prompt: prefilled in one chunk (chunk size 1024) and in four
    (chunk size 256), the kept budget and the greedy answer are the same."""
    context, question = niah_prompt(tokenizer, LISBON, 880, 0.5)
    ids = context + question
    one = ems_server.generate(ids, 16, rid="one-chunk")
    four = pressure_server.generate(ids, 16, rid="four-chunks")
    assert "#new-token: 256" in pressure_server.log()
    kept = [[e["slots_kept"] for e in s.events(rid) if e["event"] == "compressed"]
            for s, rid in ((ems_server, "one-chunk"), (pressure_server, "four-chunks"))]
    assert kept[0] == kept[1] == [round(0.1 * len(ids))]
    assert four["text"] == one["text"], (four["text"], one["text"])
    assert_healthy(pressure_server, tokenizer)


# -- bad input -----------------------------------------------------------------------------


def test_a_budget_larger_than_the_prompt_keeps_everything(plain_server, ems_server, tokenizer):
    """SnapKV with 4096 tokens on a ~330-token prompt: nothing to compress,
    no capture, no error, the exact answer."""
    ids = chat_ids(tokenizer, hay(tokenizer, 300, offset=60000) + "\n\nSummarise it.")
    not_compressed = ems_server.kv_state()["totals"]["requests_not_compressed"]
    reply = ems_server.generate(ids, 16, rid="budget-over", custom_params={"kv_policy": "snapkv", "kv_budget": "4096"})
    assert reply["text"] == plain_server.generate(ids, 16)["text"]
    assert ems_server.events("budget-over") == []
    state = assert_healthy(ems_server, tokenizer)
    assert state["totals"]["requests_not_compressed"] == not_compressed


def test_a_compression_reopens_admission(pressure_server, tokenizer):
    """A request that did not fit beside an uncompressed prompt is admitted
    once that prompt is compressed, not only when a request leaves (SGLang
    stops trying new prefills after one did not fit and reopens on a leaving
    request; kvpolicy reopens after each compression). In the 1024-slot pool
    two 520-token prompts do not fit together exact; compressed to 10% they
    do, so both decode at once while each keeps decoding on purpose."""
    server = pressure_server
    server.flush_cache()
    rids = ["admit-first", "admit-second"]
    prompts = [chat_ids(tokenizer, hay(tokenizer, 500, offset=41000 + 5000 * k) + "\nGo on.") for k in range(2)]
    assert all(2 * len(p) > PRESSURE_POOL for p in prompts)
    first = server.generate_in_background(prompts[0], KEEP_DECODING, rids[0], ignore_eos=True)
    second = server.generate_in_background(prompts[1], KEEP_DECODING, rids[1], ignore_eos=True)
    try:
        state = server.wait_until(lambda s: all(r in s["scheduler"]["running"] for r in rids), "both decoding",
                                  timeout=600)
        assert set(state["running"]) >= set(rids), state["running"]  # both compressed
    finally:
        for rid in rids:
            server.abort(rid)
        first.result(), second.result()
    assert_healthy(server, tokenizer)
