"""The evaluation harness on a tiny model: structure, sharing, and the full
cache as the reference."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="evaluation needs transformers (installed by `make test`)")

from kvpolicy.eval import evaluate as ev  # noqa: E402
from kvpolicy.lang.errors import PolicyError  # noqa: E402
from tests.model.tiny import tiny_llama  # noqa: E402


def test_entries_cross_policies_and_budgets():
    batch = ev.entries(["full", "snapkv", "ems"], ["2%", "64"])
    assert [e.label for e in batch] == ["full", "snapkv@2%", "snapkv@64", "ems@2%", "ems@64"]
    with pytest.raises(PolicyError):
        ev.entries(["snpkv"], None)


def test_niah_records_every_case_in_both_modes():
    lm, tok, shape = tiny_llama()
    batch = ev.entries(["full", "snapkv"], ["64"])
    spec = ev.NeedleSpec("The magic number is 1234567.", "What is the magic number?", "1234567")
    r = ev.niah(lm, tok, shape, batch, lengths=(300,), depths=(0.2, 0.8), needles=[spec], max_new_tokens=4,
                progress=False)
    assert len(r["cases"]) == 2 * 2 * 2  # depths x modes x policies
    for c in r["cases"]:
        assert c["prompt_tokens"] <= 300 + 40 and isinstance(c["correct"], bool)
        full_slots = c["prompt_tokens"] * shape.num_layers * shape.num_kv_heads
        assert c["kept_slots"] == (full_slots if c["policy"] == "full" else 64 * shape.num_layers * shape.num_kv_heads)
    assert set(r["summary"]) == {"full", "snapkv@64"}
    assert "policy" in ev.table(r) or "full" in ev.table(r)


def test_niah_prompt_puts_the_needle_inside_the_context():
    _, tok, _ = tiny_llama()
    spec = ev.NeedleSpec()
    ctx, question = ev.niah_prompt(tok, spec, 400, 0.5)
    assert spec.needle in tok.decode(ctx) and spec.question in tok.decode(question)
    assert spec.needle not in tok.decode(question)


def test_perplexity_of_the_full_cache_is_the_reference():
    lm, tok, shape = tiny_llama()
    batch = ev.entries(["full", "snapkv", "streamingllm"], ["64"])
    r = ev.perplexity(lm, tok, shape, batch, context=200, target=32, windows=2, progress=False)
    assert r["ratio_to_full"]["full"] == 1.0
    assert all(v > 0 for v in r["ppl"].values()) and len(r["cases"]) == 2 * 3


def test_ruler_cases_hide_their_answers_in_the_context():
    from kvpolicy.eval.ruler import TASKS, make_cases

    _, tok, _ = tiny_llama()
    for task in TASKS:
        (case,) = make_cases(tok, task, 600, 1)
        context = tok.decode(case.context)
        assert case.expected and all(x in context for x in case.expected), task
        assert make_cases(tok, task, 600, 1)[0].context == case.context  # fixed seeds
    with pytest.raises(ValueError, match="unknown RULER task"):
        make_cases(tok, "nope", 600, 1)


def test_ruler_runs_and_scores_shares():
    from kvpolicy.eval.ruler import ruler

    lm, tok, shape = tiny_llama()
    r = ruler(lm, tok, shape, ev.entries(["full", "snapkv"], ["64"]), tasks=("multivalue",), length=400,
              samples=1, max_new_tokens=3, progress=False)
    assert len(r["cases"]) == 2 and all(0 <= c["score"] <= 1 for c in r["cases"])


def test_longbench_metrics_by_hand():
    from kvpolicy.eval import longbench as lb

    assert lb.qa_f1("The Eiffel Tower", "eiffel tower") == 1.0
    assert lb.qa_f1("Paris France", "Paris") == pytest.approx(2 / 3)
    assert lb.rouge_l("a b c d", "a c d") == pytest.approx(2 * (3 / 4) * 1 / (3 / 4 + 1))
    assert lb.classification("This is about LOC", "LOC", all_classes=["LOC", "HUM"]) == 1.0
    assert lb.number_match("Paragraph 12", "Paragraph 12") == 1.0
    assert lb.code_sim("x = 1\n", "x = 1") == 1.0


def test_longbench_reads_a_folder_and_scores(tmp_path):
    import json

    from kvpolicy.eval.longbench import longbench, read_dir

    rows = [{"context": "Alice lives in Paris. " * 20, "input": "Where does Alice live?", "answers": ["Paris"]}]
    (tmp_path / "hotpotqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert list(read_dir(tmp_path)) == ["hotpotqa"]
    lm, tok, shape = tiny_llama()
    r = longbench(lm, tok, shape, ev.entries(["full", "snapkv"], ["64"]), tmp_path, max_length=300,
                  max_new_tokens=3, progress=False)
    assert [c["dataset"] for c in r["cases"]] == ["hotpotqa", "hotpotqa"]
    (tmp_path / "unknown.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="unknown LongBench dataset"):
        read_dir(tmp_path)


def test_niah_heatmaps_are_pngs(tmp_path):
    from kvpolicy.eval.plots import niah_heatmaps

    cases = [{"policy": p, "mode": "query-aware", "length": L, "depth": d, "correct": (L + int(10 * d)) % 2 == 0}
             for p in ("full", "ems@2%") for L in (2048, 4096) for d in (0.1, 0.5)]
    paths = niah_heatmaps({"cases": cases}, tmp_path)
    assert sorted(p.name for p in paths) == ["niah_ems_2pct_query-aware.png", "niah_full_query-aware.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
