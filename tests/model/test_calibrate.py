"""Calibration on a tiny random model writes valid artifacts, and the
retrieval score is the attention mass the paper defines."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="calibration needs transformers (installed by `make test`)")

import kvpolicy as kp  # noqa: E402
from kvpolicy.eval.calibrate import calibrate_heads, calibrate_layers  # noqa: E402
from kvpolicy.eval.haystack import NEEDLES, build_probe  # noqa: E402
from kvpolicy.lang.artifacts import check_artifact  # noqa: E402
from tests.model.tiny import tiny_llama  # noqa: E402


def test_heads_artifact_from_a_tiny_model():
    lm, tok, shape = tiny_llama()
    art = calibrate_heads(lm, tok, shape, lengths=(256,), depths=(0.5,), needles=NEEDLES[:2],
                          max_new_tokens=6, min_recall=None, progress=False)
    check_artifact(art, "retrieval_heads")
    assert (art["num_layers"], art["num_heads"]) == (2, 4) and art["calibration"]["counted"] == 2
    for row, ranked in zip(art["scores"], art["ranked"], strict=True):
        assert [row[h] for h in ranked] == sorted(row, reverse=True)


def test_retrieval_score_is_attention_mass_on_the_needle_when_a_needle_token_is_emitted():
    """Recompute one trial with transformers' own eager attention weights."""
    lm, tok, shape = tiny_llama(seed=3)
    probe = build_probe(tok, NEEDLES[0], 240, 0.5)
    s, e = probe.needle_span
    needle_ids = probe.input_ids[s:e]
    expected = torch.zeros(2, 4, dtype=torch.float64)
    ids = torch.tensor([probe.input_ids])
    lm.config._attn_implementation = "eager"
    with torch.no_grad():
        for _ in range(6):
            out = lm(input_ids=ids, output_attentions=True)
            y = int(out.logits[0, -1].argmax())
            if y == tok.eos_token_id:
                break
            c = needle_ids.count(y)
            for layer, att in enumerate(out.attentions):
                expected[layer] += c * att[0, :, -1, s:e].sum(-1).double()
            ids = torch.cat([ids, torch.tensor([[y]])], dim=1)
    lm.config._attn_implementation = "sdpa"
    art = calibrate_heads(lm, tok, shape, lengths=(240,), depths=(0.5,), needles=NEEDLES[:1],
                          max_new_tokens=6, min_recall=None, progress=False)
    torch.testing.assert_close(torch.tensor(art["scores"], dtype=torch.float64), expected, rtol=1e-4, atol=1e-6)


def test_layers_artifact_from_a_tiny_model(tmp_path, monkeypatch):
    import json

    lm, tok, shape = tiny_llama()
    heads = calibrate_heads(lm, tok, shape, lengths=(256,), depths=(0.5,), needles=NEEDLES[:1],
                            max_new_tokens=4, min_recall=None, progress=False)
    (tmp_path / "tiny-llama.heads.json").write_text(json.dumps(heads))
    monkeypatch.setenv("KVPOLICY_ARTIFACTS", str(tmp_path))
    art = calibrate_layers(lm, tok, shape, kp.compresskv(), budget=16, length=320, per_dataset=1,
                           max_new_tokens=4, progress=False)
    check_artifact(art, "layer_budgets")
    assert len(art["shares"]) == 2 and abs(sum(art["shares"]) - 1) < 1e-9
    assert set(art["calibration"]["shares_per_dataset"]) == {"needle_qa", "kv_lookup", "continuation"}
    # pooled policies (heads keep different counts) go through the same path
    art2 = calibrate_layers(lm, tok, shape, kp.adakv(), budget=40, length=320, per_dataset=1,
                            max_new_tokens=3, progress=False)
    check_artifact(art2, "layer_budgets")
