"""The compose API builds the same IR as the language."""

from __future__ import annotations

import pytest

import kvpolicy as kp
from kvpolicy.dsl import parse
from kvpolicy.lang import ir


@pytest.mark.parametrize("name", sorted(kp.METHODS))
def test_constructor_defaults_equal_the_shipped_file(name):
    assert kp.METHODS[name]() == kp.load(name)


def test_load_by_path(tmp_path):
    path = tmp_path / "mine.kvp"
    path.write_text(kp.snapkv(budget=64).to_kvp())
    assert kp.load(str(path)) == kp.snapkv(budget=64)
    assert kp.load(path).budget == ir.Budget(64, "tokens")


def test_load_unknown_name_suggests():
    with pytest.raises(kp.PolicyError) as info:
        kp.load("snpkv")
    assert info.value.hint == "did you mean 'snapkv'?"


def test_hyperparameters_land_in_the_ir():
    p = kp.snapkv(budget="5%", window=16, pool=kp.max_pool(7))
    assert p.budget == ir.Budget(5.0, "percent")
    assert p.protect.recent == 16 and p.score("s") == ir.LocalAttention(16, ir.Pool("max", 7))
    assert kp.pyramidkv(beta=10).layers == ir.Pyramid(10.0)
    assert kp.adakv(safeguard=0.5).selection.safeguard == 0.5
    assert kp.ems(threshold=0.8).selection.merge.threshold == 0.8
    assert kp.compresskv(top=2).score("votes").heads == ir.RetrievalHeads(2, None)
    assert kp.streamingllm(sink=8).protect.sink == 8


def test_combinators_round_trip_through_text():
    p = (kp.ems(budget="2%").with_layers(kp.pyramid(beta=20)).with_override(range(2), "100%")
         .with_trigger(prefill=True, decode_every=128).with_name("ems2", "EMS, pyramid"))
    assert p.overrides == (ir.LayerOverride((0, 1), ir.Budget(100.0, "percent")),)
    assert parse(p.to_kvp()) == p
    again = p.with_override(1, 64)  # a later override replaces the earlier one for that layer
    assert again.overrides == (ir.LayerOverride((0,), ir.Budget(100.0, "percent")),
                               ir.LayerOverride((1,), ir.Budget(64, "tokens")))


def test_policy_from_parts_with_score_arithmetic():
    p = kp.policy("mix", "5%", keep=dict(sink=4, recent=32),
                  scores=dict(g=kp.global_(norm="mean"), l=kp.local(32, pool=kp.avg_pool(5)),
                              s=kp.mean_align("g", "l") - 0.1 * kp.key_norm()),
                  select=kp.per_head("s", merge=kp.similar(threshold=0.95), zero_class=True))
    assert p.score("s") == ir.WeightedSum(((1.0, ir.Normalize("mean_align", (ir.ScoreRef("g"), ir.ScoreRef("l")))),
                                           (-0.1, ir.KeyNorm())))
    assert parse(p.to_kvp()) == p


def test_python_policies_get_the_same_checks():
    with pytest.raises(kp.PolicyError, match="fill the whole budget of 16 tokens"):
        kp.snapkv(budget=16)
    with pytest.raises(kp.PolicyError, match=r"window \(64\) is not smaller than the budget \(48 tokens\)"):
        kp.policy("x", 48, scores=dict(s=kp.local(64)), select=kp.per_head("s"))
    with pytest.raises(kp.PolicyError, match="no score named 'nope'"):
        kp.policy("x", 64, scores=dict(s=kp.recency()), select=kp.per_head("nope"))
    with pytest.raises(kp.PolicyError, match="give tokens as an int"):
        kp.as_budget(0.02)
    with pytest.raises(kp.PolicyError, match="budget '2 percent': unexpected word 'percent'"):
        kp.as_budget("2 percent")
    with pytest.raises(kp.PolicyError, match="expected one budget"):
        kp.as_budget("5%; policy x")
    assert kp.as_budget("256 tokens") == kp.as_budget(256) == kp.as_budget("256") == ir.Budget(256, "tokens")
    assert kp.as_budget("5%, floor 128") == ir.Budget(5.0, "percent", floor=128)
