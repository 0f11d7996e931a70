"""Budget sweeps (kvpolicy.eval.sweep) and the batched decoding they rely on."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers", reason="evaluation needs transformers (installed by `make test`)")

from kvpolicy.eval import evaluate as ev  # noqa: E402
from kvpolicy.eval import sweep as sw  # noqa: E402
from kvpolicy.lang.registry import load  # noqa: E402
from tests.model.tiny import tiny_llama  # noqa: E402


def test_batched_decoding_answers_as_one_policy_at_a_time():
    """Policies of every kind (full, rank-slot, per-layer budgets, pooled
    heads, merge) decoded together give the answers each gives alone."""
    lm, tok, shape = tiny_llama()
    batch = ev.entries(["full", "snapkv", "pyramidkv", "adakv", "ems", "streamingllm"], ["20%", "64"])
    spec = ev.NeedleSpec("The magic number is 1234567.", "What is the magic number?", "1234567")
    cases = []
    for depth in (0.3, 0.7):
        ctx, q = ev.niah_prompt(tok, spec, 300, depth)
        cases.append(ev.Case(ctx, q, (spec.answer,), {"depth": depth}))
    kw = dict(modes=("query-aware", "context-only"), max_new_tokens=6, progress=False)
    alone = ev.run_cases(lm, tok, shape, batch, cases, decode_batch=1, **kw)
    together = ev.run_cases(lm, tok, shape, batch, cases, decode_batch=16, **kw)
    three = ev.run_cases(lm, tok, shape, batch, cases, decode_batch=3, **kw)
    assert [r["answer"] for r in alone] == [r["answer"] for r in together] == [r["answer"] for r in three]
    assert [r["kept_slots"] for r in alone] == [r["kept_slots"] for r in together]
    assert len({r["answer"] for r in alone}) > 1  # the policies do not all answer alike: the check can fail


def test_smallest_budget_is_the_first_reaching_ninety_percent_of_full():
    budgets = ["2%", "5%", "10%"]
    points = {f"{p}@{b}": sw.Point(p, b) for p in ("a", "b", "c") for b in budgets}
    scores = {t: {"full": 0.8, "a@2%": 0.1, "a@5%": 0.72, "a@10%": 0.6,
                  "b@2%": 0.0, "b@5%": 0.5, "b@10%": 0.71, "c@2%": 0.9, "c@5%": 0.9, "c@10%": 0.9}
              for t in sw.TASKS}
    got = sw.smallest_budgets(scores, points, budgets)
    assert got["ppl"] == {"a": "5%", "b": None, "c": "2%"}  # 0.72 = 0.9 * 0.8 reaches it; 0.71 does not


def test_smallest_budget_is_none_when_the_full_cache_scores_zero():
    points = {"a@2%": sw.Point("a", "2%")}
    scores = {t: {"full": 0.0, "a@2%": 0.0} for t in sw.TASKS}
    assert sw.smallest_budgets(scores, points, ["2%"])["niah query-aware"] == {"a": None}


def test_sweep_on_a_tiny_model_scores_every_task_and_plots_them(tmp_path):
    lm, tok, shape = tiny_llama()
    policies = [load(n) for n in ("full", "snapkv", "streamingllm")]
    needles = (ev.NeedleSpec("The magic number is 1234567.", "What is the magic number?", "1234567"),)
    r = sw.sweep(lm, tok, shape, policies, budgets=("10%", "50%"), lengths=(300,), depths=(0.5,), needles=needles,
                 ruler_samples=1, ruler_length=400, ppl_windows=1, ppl_context=200, ppl_target=16,
                 max_new_tokens=4, progress=False)
    assert r["policies"] == ["snapkv", "streamingllm"]
    assert set(r["scores"]) == set(sw.TASKS) == set(r["smallest_budget"])
    for task in sw.TASKS:
        assert set(r["scores"][task]) == {"snapkv@10%", "snapkv@50%", "streamingllm@10%", "streamingllm@50%"}
        assert all(0.0 <= v for v in r["scores"][task].values())
    assert r["full"]["ppl"] == 1.0
    assert len(r["raw"]["niah"]["cases"]) == 2 * 5  # modes x (full + 2 policies x 2 budgets)
    json.dumps(r)  # what --json writes
    text = sw.table(r)
    assert "smallest budget" in text and "streamingllm" in text
    assert sw.markdown(r).count("\n") == 2 + 1 + 1  # header, rule, full, two policies
    from kvpolicy.eval.plots import sweep_curves

    paths = sweep_curves(r, tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"sweep_{t.replace(' ', '_')}.png" for t in sw.TASKS)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_a_sweep_refuses_budgets_in_tokens_before_loading_the_model(capsys):
    from kvpolicy.cli import main

    assert main(["eval", "sweep", "--policy", "snapkv", "--budgets", "10%", "256"]) == 1
    assert "a sweep's budgets are shares of the prompt ('10%'), got '256'" in capsys.readouterr().err
