"""parse(format(p)) == p: for every shipped policy and for generated IR."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from kvpolicy import load, shipped_names
from kvpolicy.dsl import format_policy, parse
from kvpolicy.dsl.formatter import format_source
from kvpolicy.lang import ir
from kvpolicy.lang.registry import shipped_path
from kvpolicy.lang.validate import validate
from tests.strategies import policies

SHIPPED = ["adakv", "compresskv", "ems", "full", "h2o", "pyramidkv", "rkv", "snapkv", "spankv", "streamingllm"]


def test_every_method_is_shipped():
    assert shipped_names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_policy_round_trips(name):
    p = load(name)
    assert p.name == name
    assert parse(format_policy(p)) == p


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_is_canonical_and_cites_its_paper(name):
    path = shipped_path(name)
    text = path.read_text()
    assert format_source(text, str(path)) == text
    if name != "full":
        assert "arXiv" in text.split("\npolicy")[0], "the header comment cites the paper"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies())
def test_generated_policy_round_trips(p):
    validate(p)  # the generator makes only valid policies
    text = format_policy(p)
    assert parse(text) == p, text
    assert format_source(text) == text, text  # canonical text is a fixed point of fmt


def test_python_arithmetic_matches_the_text():
    g, l = ir.GlobalAttention(), ir.LocalAttention(8)
    assert parse("policy x\nbudget 100%\nscore g = global()\nscore s = 2 * g - local(window=8) + 0.5 * key_norm()\n"
                 ).score("s") == 2 * ir.ScoreRef("g") - l + 0.5 * ir.KeyNorm()
    assert -(g + l) == ir.WeightedSum(((-1.0, g), (-1.0, l)))
    assert 2 * (g + l) == ir.WeightedSum(((2.0, g), (2.0, l)))


def test_parenthesised_sum_stays_nested():
    p = parse("policy x\nbudget 100%\nscore s = (global() + recency()) + key_norm()\n")
    (w, inner), (w2, kn) = p.score("s").terms
    assert isinstance(inner, ir.WeightedSum) and kn == ir.KeyNorm()
    assert parse(format_policy(p)) == p


def test_single_line_block_and_semicolons():
    a = parse("policy a; budget 64 tokens; score r = recency(); per layer { keep top r; evict rest }")
    b = parse("policy a\nbudget 64 tokens\nscore r = recency()\nper layer {\n  keep top r\n}\n")
    assert a == b
