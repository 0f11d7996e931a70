"""Whatever the text, the parser answers with a Policy or a PolicyError --
never a Lark exception, a KeyError or a traceback of ours."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpolicy.dsl import parse
from kvpolicy.dsl.formatter import format_source
from kvpolicy.lang.errors import PolicyError
from kvpolicy.lang.registry import shipped_path

SHIPPED_TEXTS = [shipped_path(n).read_text() for n in ("ems", "snapkv", "adakv", "streamingllm", "h2o")]
ALPHABET = "abcdeglmnoprstuvwxyz_0123456789 .,;=%+-*<>#(){}[]\"\\\n\t$"
FRAGMENTS = ["policy", "budget", "keep", "score", "per", "layers", "layer", "trigger", "merge", "evict", "top",
             "rest", "into", "tokens", "%", "global(", "local(", "window=", "pool=", "avg(", "max(", "heads=",
             "retrieval(", "mean_align(", "{", "}", ";", "\n", ",", "=", "0", "-1", "1e999", "100", "99999999999999999999",
             '"x.json"', "extends", "pooled(", "similar(", "cosine >", "l2 <", "zero_class", "every", "prefill"]

fuzz = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def only_policy_errors(text: str) -> None:
    try:
        parse(text)
    except PolicyError as err:
        str(err)  # the message itself must render
        return
    # it parsed: then formatting must work and be stable
    canonical = format_source(text)
    assert format_source(canonical) == canonical


@fuzz
@given(st.text(max_size=200))
def test_random_text(text):
    only_policy_errors(text)


@fuzz
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(ALPHABET, max_size=4)), max_size=40))
def test_random_fragments(parts):
    only_policy_errors(" ".join(parts))


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SHIPPED_TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["delete", "insert", "replace", "duplicate-line", "drop-line"]))
        if op == "delete":
            j = draw(st.integers(i, min(len(text), i + 12)))
            text = text[:i] + text[j:]
        elif op == "insert":
            text = text[:i] + draw(st.one_of(st.sampled_from(FRAGMENTS), st.text(ALPHABET, max_size=3))) + text[i:]
        elif op == "replace" and i < len(text):
            text = text[:i] + draw(st.sampled_from(ALPHABET)) + text[i + 1:]
        else:
            lines = text.split("\n")
            k = draw(st.integers(0, len(lines) - 1))
            lines[k:k + 1] = [lines[k], lines[k]] if op == "duplicate-line" else []
            text = "\n".join(lines)
    return text


@fuzz
@given(mutated())
def test_mutated_shipped_policies(text):
    only_policy_errors(text)


def test_deep_nesting_is_a_policy_error():
    text = "policy x\nbudget 100%\nscore s = " + "(" * 500 + "recency()" + ")" * 500 + "\n"
    try:
        parse(text)
    except PolicyError as err:
        assert "nested too deeply" in err.message
    else:
        raise AssertionError("500 levels of parentheses should be refused")
