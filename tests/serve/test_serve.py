"""Serving with ``--kv-policy`` inside SGLang (issue: compressed KV in the
pool, slots freed, radix cache on). Real servers, default model, CPU."""

from __future__ import annotations

import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kvpolicy.eval.evaluate import NeedleSpec, niah_prompt
from kvpolicy.exec.pipeline import compile_pipeline
from kvpolicy.lang.budgets import DEFAULT_MODEL
from kvpolicy.lang.registry import load
from kvpolicy.sglang_ext import server as srv
from kvpolicy.sglang_ext.server import held_slots, invariant_problems

from .conftest import EMS_10, SERVER_FLAGS, ems10_server
from .helpers import HangUp, assert_healthy, assert_packed, chat_ids, hang_up_after, hay, stream_completion

B_ROLLING = 96  # the "rolling" folder policy's budget (conftest.FOLDER_POLICIES)


@pytest.mark.slow
def test_niah_served_from_a_compressed_pool(ems_server, tokenizer):
    """A 2k-token needle prompt over the OpenAI API with EMS at 10%: the answer
    is right, and while it decodes the pool shows the request holding about
    budget-many slots, not prompt-length many. It decodes on purpose
    (``ignore_eos``) well past the snapshot, so the snapshot sees it running."""
    ems_server.flush_cache()  # nothing cached: the whole prompt is prefilled, in chunks
    # a case EMS at 10% answers on the transformers path (bench/results/
    # sweep_smollm2.json: 7-digit needle, 2048 tokens, depth 0.5), so the
    # answer checks the server, not the policy's quality
    context, question = niah_prompt(tokenizer, NeedleSpec(), 2048, 0.5)
    ids = context + question
    N = len(ids)
    B = compile_pipeline(load(ems_server.args[-1]), DEFAULT_MODEL, N).plan.layer_budgets[0]
    seen = {}

    def snapshot(n):
        if n == 4:
            seen["state"] = ems_server.kv_state()

    answer = stream_completion(ems_server, ids, 120, on_chunk=snapshot, ignore_eos=True)
    assert NeedleSpec.answer in answer, answer

    state = seen["state"]
    (record,) = state["running"].values()
    (decoded,) = state["scheduler"]["running"].values()
    assert record["prompt_tokens"] == N and record["slots_kept"] == B == round(0.1 * N)
    assert record["position_offset"] == N - B
    # the pool's own counters: what is neither free nor in the tree is this
    # request's: its B kept tokens and the ones it has decoded so far
    assert 4 <= decoded < 120
    assert B <= held_slots(state) <= B + decoded + 1 < N // 5
    # the uncompressed prompt stayed in the radix tree as evictable, exact cache
    assert record["slots_released_to_tree"] + record["slots_freed"] == N
    assert state["evictable_slots"] >= N - 1
    log = ems_server.log()
    assert f"prompt={N} kept={B} slots" in log
    assert "#new-token: 1024, #cached-token: 0" in log  # its prefill came in chunks

    assert_healthy(ems_server, tokenizer)


def test_full_policy_is_token_identical_to_a_server_without_policy(plain_server, ems_server, tokenizer):
    ids = chat_ids(tokenizer, hay(tokenizer, 600, offset=5000) + "\n\nSummarise the text above in one sentence.")
    plain = plain_server.generate(ids, 32)
    full = ems_server.generate(ids, 32, custom_params={"kv_policy": "full"})
    assert "text" in plain and "text" in full, (plain, full)
    assert full["text"] == plain["text"]
    assert full["meta_info"]["completion_tokens"] == plain["meta_info"]["completion_tokens"] > 8
    assert_healthy(ems_server, tokenizer)


@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "adakv", "compresskv", "h2o", "ems", "rkv"])
def test_served_equals_the_transformers_path(ems_server, tokenizer, model_dir, policy):
    """Greedy tokens from the server equal ``hf.generate`` under the same
    policy: equal budgets (snapkv, the rank-slot layout), per-layer budgets
    (pyramidkv, compresskv) and per-head budgets (adakv), the last three in
    the row layout, each holding the slots its plan says; ``global()``
    scores (h2o, ems) captured in one attention pass on both sides."""
    from kvpolicy.hf import generate as hf
    from kvpolicy.hf.models import load_model

    ids = chat_ids(tokenizer, hay(tokenizer, 400, offset=9000) + "\n\nWhat is this text about?")
    rid = f"parity-{policy}"
    if policy in ("h2o", "ems"):
        # global() sums the queries this prefill computes: on a radix hit of
        # the earlier cases' prompt that is only the new ones (runtime docstring)
        ems_server.flush_cache()
    served = ems_server.generate(ids, 24, rid=rid, custom_params={"kv_policy": policy, "kv_budget": "96"})
    lm, tok, shape = load_model(str(model_dir))
    chosen = load(policy).with_budget("96")
    new, state = hf.generate(lm, torch.tensor([ids]), chosen, shape, max_new_tokens=24)
    expected = tok.decode(new[0], skip_special_tokens=True)
    assert served["text"] == expected, (served["text"], expected)
    assert served["meta_info"]["completion_tokens"] == 24
    (event,) = [e for e in ems_server.events(rid) if e["event"] == "compressed"]
    assert_packed(event, chosen, len(ids))
    assert event["rows_per_layer"] == state.kept[0]  # what the transformers path kept, layer by layer
    assert_healthy(ems_server, tokenizer)


def test_a_decode_trigger_is_served_as_the_transformers_path_runs_it(ems_server, tokenizer, model_dir):
    """``trigger prefill, every 16 tokens`` at 96 slots (SnapKV's scores over
    a window that slides with the generation): greedy tokens equal
    ``hf.generate`` under the same policy, for a prompt compressed at prefill
    and for one under the budget, which starts compressing once its
    generation crosses it. Every 16 decoded tokens the request is
    recompressed in place: it never holds more than ``96 + 16`` slots (and
    the step the overlap scheduler prepared), and each check ran before that
    step was launched (``prepared``)."""
    from kvpolicy.dsl.parser import parse
    from kvpolicy.hf import generate as hf
    from kvpolicy.hf.models import load_model

    from .conftest import FOLDER_POLICIES

    policy = parse(FOLDER_POLICIES["rolling"])
    lm, tok, shape = load_model(str(model_dir))
    B, every, new_tokens = B_ROLLING, 16, 64
    for name, words in (("long", 400), ("short", 30)):
        ids = chat_ids(tokenizer, hay(tokenizer, words, offset=61000) + "\n\nWrite a long story about it.")
        rid = f"rolling-{name}"
        served = ems_server.generate(ids, new_tokens, rid=rid, custom_params={"kv_policy": "rolling"},
                                     ignore_eos=True)
        expected, state = hf.generate(lm, torch.tensor([ids]), policy, shape, max_new_tokens=new_tokens)
        assert served["output_ids"] == expected[0].tolist(), (name, served["text"], tok.decode(expected[0]))
        events = ems_server.events(rid)
        checks = [e for e in events if e["event"] == "recompressed"]
        # fed tokens 16, 32, 48 (the 64th is returned, never fed); the short
        # prompt is over 96 slots from the second check on
        over = [k * every for k in (1, 2, 3) if (len(ids) if name == "short" else B) + k * every > B]
        assert len(ids) > B if name == "long" else len(ids) < B, (name, len(ids))
        assert len(checks) == len(over) >= 2, (name, len(ids), checks)
        for e in checks:
            assert e["slots_kept"] == B and e["written"] <= B + every and e["held"] <= B + every + 1, e
            assert e["prepared"], e  # the overlap scheduler's next step waited for the check
        assert checks[0]["first"] == (name == "short")
        assert [e["event"] for e in events if e["event"] == "compressed"] == (["compressed"] if name == "long" else [])
        assert all(int(valid[0].sum(dim=1).max()) <= B + every for valid in state.valid)  # the same bound there
    assert_healthy(ems_server, tokenizer)


def test_a_request_aborted_after_recompressions_gives_every_slot_back(ems_server, tokenizer):
    """Cancelled while decoding under a decode trigger, after it was
    recompressed twice: its private slots go back, its record and window
    are forgotten, nothing compressed is in the tree."""
    ids = chat_ids(tokenizer, hay(tokenizer, 300, offset=64000) + "\n\nGo on.")
    rid = "rolling-abort"
    target = ems_server.generate_in_background(ids, 2000, rid, custom_params={"kv_policy": "rolling"},
                                               ignore_eos=True)
    ems_server.wait_until(lambda s: sum(e["rid"] == rid and e["event"] == "recompressed" for e in s["events"]) >= 2,
                          f"two recompressions of {rid}", 300)
    state = ems_server.kv_state()
    assert not invariant_problems(state), invariant_problems(state)
    assert B_ROLLING <= held_slots(state) <= B_ROLLING + 16 + 1, held_slots(state)
    ems_server.abort(rid)
    reply = target.result()
    assert reply["meta_info"]["finish_reason"]["type"] == "abort", reply["meta_info"]
    released = ems_server.events(rid)[-1]
    assert released["event"] == "released" and released["compressed"], released
    end = assert_healthy(ems_server, tokenizer)
    assert end["totals"]["decode_compressions"] >= 2


@pytest.mark.slow
def test_the_overlap_scheduler_serves_what_a_server_without_it_serves(ems_server, tokenizer, model_dir, tmp_path):
    """With ``--kv-policy`` SGLang's overlap scheduler stays on: a request's
    first decode step is prepared before its prefill result is processed, so
    compression runs in a sync before that step and moves it from position
    ``N`` to ``B``. Greedy outputs equal those of the same server with
    ``--disable-overlap-schedule``, for a ``global()`` policy captured in one
    attention pass (ems, prompt in two chunks), the rank-slot layout (snapkv)
    and the row layout (adakv)."""
    cases = [("ems", 1500, None), ("snapkv", 700, {"kv_policy": "snapkv", "kv_budget": "96"}),
             ("adakv", 700, {"kv_policy": "adakv", "kv_budget": "15%"})]
    prompts = {name: chat_ids(tokenizer, hay(tokenizer, n, offset=20000 + 3000 * k) + "\n\nWhat is this about?")
               for k, (name, n, _) in enumerate(cases)}
    plain = ems10_server(model_dir, tmp_path, SERVER_FLAGS + ["--chunked-prefill-size", "1024",
                                                              "--disable-overlap-schedule"], {})
    try:
        expected = {name: plain.generate(prompts[name], 24, **({"custom_params": c} if c else {}))["text"]
                    for name, _, c in cases}
    finally:
        plain.stop()
    for name, _, custom in cases:
        rid = f"overlap-{name}"
        served = ems_server.generate(prompts[name], 24, rid=rid, **({"custom_params": custom} if custom else {}))
        assert served["text"] == expected[name], (name, served["text"], expected[name])
        (event,) = [e for e in ems_server.events(rid) if e["event"] == "compressed"]
        assert event["first_step_prepared"], event  # the overlap path ran, not a late merge
        if name == "ems":
            assert event["one_pass_layers"] == 2 * DEFAULT_MODEL.num_layers, event  # both chunks, every layer
    assert_healthy(ems_server, tokenizer)


@pytest.mark.slow
def test_radix_prefix_stays_exact_after_a_compressed_request(plain_server, ems_server, tokenizer):
    """Request 1 shares a long prefix with requests 2 and 3 and is compressed;
    2 (another question) and 3 (the next turn of 1's conversation) still hit
    the cached prefix, and 2, decoding with the full cache from it, answers
    exactly as a server that never compressed anything."""
    context = hay(tokenizer, 1500, offset=20000)
    first = chat_ids(tokenizer, context + "\n\nWhat is this text about?")
    r1 = ems_server.generate(first, 16)
    second = chat_ids(tokenizer, context + "\n\nName one keyword from the text above.")
    r2 = ems_server.generate(second, 16, custom_params={"kv_policy": "full"})
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert r2["meta_info"]["cached_tokens"] >= common - 1 > 1000
    assert r2["text"] == plain_server.generate(second, 16)["text"]

    turn = chat_ids(tokenizer, [{"role": "user", "content": context + "\n\nWhat is this text about?"},
                                {"role": "assistant", "content": r1["text"]},
                                {"role": "user", "content": "Say it in three words."}])
    assert turn[:len(first)] == first
    r3 = ems_server.generate(turn, 8)
    assert r3["meta_info"]["cached_tokens"] >= len(first) - 1
    assert "prompt=%d kept=" % len(turn) in ems_server.log()
    assert_healthy(ems_server, tokenizer)


@pytest.mark.slow
def test_no_slot_leaks_after_mixed_and_aborted_requests(ems_server, tokenizer):
    ems_server.flush_cache()
    start = ems_server.wait_idle()
    assert held_slots(start) == 0

    lengths = [60, 150, 300, 600, 1200]
    policies = [None, {"kv_policy": "snapkv"}, {"kv_policy": "full"}, {"kv_policy": "streamingllm"},
                {"kv_policy": "h2o", "kv_budget": "20%"}, {"kv_policy": "compresskv"},
                {"kv_policy": "adakv", "kv_budget": "15%"}, {"kv_policy": "pyramidkv", "kv_budget": "10%"},
                {"kv_policy": "rolling"}]
    jobs = []
    for i in range(30):
        prompt = chat_ids(tokenizer, hay(tokenizer, lengths[i % 5], offset=1000 * i) + f"\n\nQuestion {i}: summarise.")
        jobs.append((i, prompt, [1, 8, 4, 0, 2][i % 5], policies[i % len(policies)]))
    outcomes = {"ok": 0, "rejected": 0, "aborted": 0}
    lock = threading.Lock()

    def run(job):
        i, prompt, max_new, custom = job
        params = {"custom_params": custom} if custom else {}
        if i % 7 == 3:  # a client that disconnects mid-stream
            try:
                stream_completion(ems_server, prompt, 32, on_chunk=hang_up_after(2))
            except HangUp:
                pass
            kind = "aborted"
        elif i % 7 == 5:  # cancelled by id at a phase read from the server: at once, or 1 or 4 tokens in
            rid = f"leak-test-{i}"
            request = ems_server.generate_in_background(prompt, 32, rid, **params)
            if i % 3:
                ems_server.wait_decoded(rid, 1 if i % 3 == 1 else 4, unless=lambda: not request.alive())
            ems_server.abort(rid)
            request.thread.join(600)
            kind = "aborted"
        else:
            reply = ems_server.generate(prompt, max_new, **params)
            kind = "ok" if "text" in reply else "rejected"
        with lock:
            outcomes[kind] += 1

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(run, jobs))
    assert outcomes["ok"] >= 20, outcomes

    end = assert_healthy(ems_server, tokenizer)
    assert end["totals"]["requests_compressed"] > start["totals"]["requests_compressed"]


BAD_POLICIES = [
    ("policy broken\nbudget 10 tokns\n", "broken.kvp", "broken.kvp:2"),
    (None, "missing.kvp", "not found"),
    ("policy p\nextends h2o\ntrigger prefill, every 256 tokens\n", "decode.kvp", "it scores with global()"),
    ("policy p\nextends snapkv\nlayers pyramid(beta=10)\ntrigger every 64 tokens\n", "decode.kvp",
     "rank-slot layout only"),
]


@pytest.mark.serve
def test_bad_policy_exits_before_the_model_loads(model_dir, tmp_path):
    """Through SGLang's real launcher (one process start: about 40 s of imports here)."""
    path = tmp_path / "broken.kvp"
    path.write_text(BAD_POLICIES[0][0])
    cmd = srv.command(model_dir, policy=str(path), extra=SERVER_FLAGS, port=srv.free_port())
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-2000:]
    assert "broken.kvp:2" in out
    assert "Load weight" not in out and "ready to roll" not in out


@pytest.mark.parametrize("policy_text, file_name, expected", BAD_POLICIES)
def test_launch_check_names_the_problem(tmp_path, capsys, monkeypatch, policy_text, file_name, expected):
    from types import SimpleNamespace

    from kvpolicy.sglang_ext import launch

    monkeypatch.setenv(launch.ENV_POLICY, "restored after the test")

    path = tmp_path / file_name
    if policy_text is not None:
        path.write_text(policy_text)
    with pytest.raises(SystemExit) as exit_:
        launch.prepare(["--model-path", "m", "--kv-policy", str(path)], SimpleNamespace())
    assert exit_.value.code == 2 and expected in capsys.readouterr().err


def test_launch_refuses_flags_it_cannot_serve_and_adjusts_the_rest(capsys, monkeypatch):
    from types import SimpleNamespace

    from kvpolicy.sglang_ext import launch

    monkeypatch.setenv(launch.ENV_POLICY, "restored after the test")

    args = SimpleNamespace(page_size=16, enable_mixed_chunk=False, disable_overlap_schedule=False)
    with pytest.raises(SystemExit):
        launch.prepare(["--kv-policy", "snapkv"], args)
    assert "--page-size 16" in capsys.readouterr().err
    args = SimpleNamespace(page_size=1, disable_overlap_schedule=False)
    launch.prepare(["--kv-policy", "snapkv"], args)
    assert args.disable_overlap_schedule is False  # compression syncs only the step after its prefill


def test_a_request_naming_an_unknown_policy_gets_a_400(ems_server, tokenizer):
    reply = ems_server.generate(chat_ids(tokenizer, "Hello"), 4, custom_params={"kv_policy": "snapkvv"})
    assert reply["status"] == 400 and "snapkv" in reply["error"]
    assert_healthy(ems_server, tokenizer)


def test_the_launch_policy_is_the_one_served(ems_server):
    assert ems_server.args[-2:] == ["--kv-policy", ems_server.args[-1]]
    assert open(ems_server.args[-1]).read() == EMS_10
    assert ems_server.kv_state()["policy"] == "ems10"


def test_a_prompt_the_policy_cannot_plan_is_served_uncompressed():
    """A budget below the observation window at some prompt length is a plan
    error in ``kvpolicy explain``; in the server that request keeps its exact
    KV (logged), and the scheduler carries on."""
    from kvpolicy.sglang_ext.runtime import Runtime

    rt = Runtime(load("snapkv").with_keep(recent=0).with_budget("1%"))
    rt.shape = DEFAULT_MODEL
    assert rt.compresses(rt.policy, 1000) is None  # 1% of 1000 = 10 < window 32
    assert rt.compresses(rt.policy, 10000) is not None
