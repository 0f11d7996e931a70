"""Golden error messages: each bad policy names its line and column, says what
is wrong, and suggests the legal name when one is close."""

from __future__ import annotations

import pytest

from kvpolicy.dsl import parse
from kvpolicy.lang.errors import PolicyError
from tests.conftest import VALID, heads_artifact


def replace_line(prefix: str, new: str) -> str:
    """VALID with the line starting with ``prefix`` replaced by ``new``."""
    lines = VALID.splitlines()
    idx = next(i for i, l in enumerate(lines) if l.startswith(prefix))
    lines[idx] = new
    return "\n".join(lines) + "\n"


# (id, text, line, column, message fragment, hint or None)
GOLDEN = [
    ("misspelt-function", replace_line("score g", "score g = slobal()"), 4, 11,
     "unknown score function 'slobal'", "did you mean 'global'?"),
    ("misspelt-statement", replace_line("budget", "budgte 256 tokens"), 2, 1,
     "unexpected word 'budgte'", "did you mean 'budget'?"),
    ("misspelt-unit", replace_line("budget", "budget 256 token"), 2, 12,
     "unexpected word 'token'", "did you mean 'tokens'?"),
    ("window-not-below-budget", replace_line("budget", "budget 32 tokens").replace("recent 32", "recent 8"), 5, 17,
     "the observation window (32) is not smaller than the budget (32 tokens)", None),
    ("budget-zero", replace_line("budget", "budget 0 tokens"), 2, 1, "the budget must be positive, got 0", None),
    ("budget-over-100", replace_line("budget", "budget 150%"), 2, 1, "a budget of 150% is over 100% of the prompt", None),
    ("unknown-keep-score", replace_line("  keep top", "  keep top importanse"), 8, 3,
     "'keep top importanse': no score named 'importanse'", "did you mean 'importance'?"),
    ("merge-without-keep", replace_line("  keep top", "  # no keep"), 9, 3, "merge without a keep class", None),
    ("missing-artifact", replace_line("score l", 'score l = local(window=32, heads=retrieval("nope.json", top=4))'),
     5, 28, "artifact 'nope.json' not found", None),
    ("duplicate-score", replace_line("score importance", "score g = mean_align(g, l)"), 6, 7,
     "score 'g' is defined twice (first at line 4)", None),
    ("duplicate-budget", replace_line("layers", "budget 2%"), 12, 1, "duplicate 'budget' statement (first at line 2)", None),
    ("floor-with-tokens", replace_line("budget", "budget 256 tokens, floor 64"), 2, 20,
     "'floor' only applies to a percentage budget", None),
    ("wrong-comparison", replace_line("  merge", "  merge similar(keys, cosine < 0.9) into centers"), 9, 30,
     "'cosine' merges when similarity is above the threshold: write 'cosine > 0.9'", None),
    ("kv-not-cosine", replace_line("  merge", "  merge similar(kv, dot > 0.9) into centers"), 9, 3,
     "similar(kv, ...) multiplies the cosine similarities of keys and values: write 'cosine > t', not 'dot'", None),
    ("pooled-layer", replace_line("per head", "per layer pooled(safeguard=0.2) {"), 7, 11,
     "'pooled' pools the heads of a layer", None),
    ("unknown-ref", replace_line("score importance", "score importance = mean_align(g, lokal)"), 6, 34,
     "score 'lokal' is not defined", None),
    ("max-align-one-term", replace_line("score importance", "score importance = max_align(g)"), 6, 20,
     "max_align() takes at least two terms, got 1", None),
    ("unknown-global-norm", replace_line("score g", "score g = global(norm=median)"), 4, 23,
     "unknown normalisation 'median'", "did you mean 'mean'?"),
    ("forward-ref", replace_line("score g", "score g = importance"), 4, 11,
     "score 'importance' is defined later; define it first", None),
    ("protected-fill-budget", replace_line("budget", "budget 36 tokens").replace("window=32", "window=8"), 3, 1,
     "the protected tokens (sink 4 + recent 32 = 36) fill the whole budget of 36 tokens", None),
    ("no-name", VALID.replace("policy demo\n", "# nameless\n"), 1, 1, "the policy has no name", None),
    ("bad-character", replace_line("budget", "budget 2$"), 2, 9, "unexpected character '$'",
     "a budget is a number of tokens ('256 tokens') or a share of the prompt ('2%')"),
    ("even-pool", replace_line("score l", "score l = local(window=32, pool=avg(4))"), 5, 28,
     "pool size 4 must be odd", None),
    ("misspelt-option", replace_line("score l", "score l = local(windw=32)"), 5, 17,
     "unknown option of local() 'windw'", "did you mean 'window'?"),
    ("zero-class-without-merge", replace_line("  merge", "  # no merge"), 10, 3,
     "'evict rest into zero_class' only matters beside a merge class", None),
    ("misspelt-protect", replace_line("keep sink", "keep sink 4, recnt 32"), 3, 14,
     "unknown protected set 'recnt'", "did you mean 'recent'?"),
    ("misspelt-unit-name", replace_line("per head", "per haed {"), 7, 5,
     "unknown selection unit 'haed'", "did you mean 'head'?"),
    ("misspelt-schedule", replace_line("layers", "layers pyramd(beta=20)"), 12, 8,
     "unknown layer schedule 'pyramd'", "did you mean 'pyramid'?"),
    ("unclosed-block", VALID.replace("}\nlayers uniform\n", ""), 10, 29, "unexpected end of file", None),
    ("statement-inside-block", VALID.replace("}\n", ""), 11, 1, "unexpected 'layers'", None),
    ("function-without-call", replace_line("score g", "score g = global"), 4, 11,
     "'global' is a function: write global()", None),
    ("layer-twice", VALID + "layer 0-2 budget 100%\nlayer 2 budget 50%\n", 14, 1,
     "layer 2 is overridden twice (first at line 13)", None),
    ("whole-number", replace_line("keep sink", "keep sink 4.5, recent 32"), 3, 11,
     "'sink' must be a whole number, got 4.5", None),
    ("misspelt-gqa", replace_line("score g", "score g = global(gqa=maxx)"), 4, 22,
     "unknown GQA reduction 'maxx'", "did you mean 'max'?"),
]


@pytest.mark.parametrize("case", GOLDEN, ids=[c[0] for c in GOLDEN])
def test_golden_error(case, tmp_path):
    _, text, line, column, message, hint = case
    path = tmp_path / "bad.kvp"
    path.write_text(text)
    with pytest.raises(PolicyError) as info:
        parse(text, str(path))
    err = info.value
    assert (err.line, err.column) == (line, column), str(err)
    assert message in err.message, str(err)
    assert err.hint == hint, str(err)
    # the printed form: file:line:col, the source line, a caret under the column
    printed = str(err).splitlines()
    assert printed[0].startswith(f"{path}:{line}:{column}: error: ")
    assert printed[1] == "  " + text.splitlines()[line - 1]
    assert printed[2] == "  " + " " * (column - 1) + "^"


def test_malformed_artifact_names_the_line(tmp_path, write_json):
    bad = heads_artifact()
    bad["ranked"][1] = [0, 0, 1, 2]  # not a permutation
    write_json("heads.json", bad)
    text = replace_line("score l", 'score l = local(window=32, heads=retrieval("heads.json", top=2))')
    with pytest.raises(PolicyError) as info:
        parse(text, str(tmp_path / "p.kvp"))
    assert info.value.line == 5
    assert "'ranked'[1] is not a permutation of the 4 heads" in info.value.message


def test_valid_artifact_is_accepted(tmp_path, write_json):
    write_json("heads.json", heads_artifact())
    text = replace_line("score l", 'score l = local(window=32, heads=retrieval("heads.json", top=2))')
    p = parse(text, str(tmp_path / "p.kvp"))
    assert p.score("l").heads.artifact == "heads.json"


def test_expected_tokens_are_listed():
    with pytest.raises(PolicyError) as info:
        parse("policy x\nbudget 10\n")
    err = info.value
    assert "'tokens'" in err.expected and "'%'" in err.expected
    assert "expected one of:" in str(err)


def test_error_in_extended_file_points_into_that_file(tmp_path):
    (tmp_path / "base.kvp").write_text(VALID.replace("pool=max(7)", "pool=max(4)"))
    child = tmp_path / "child.kvp"
    child.write_text('extends "base.kvp"\npolicy child\n')
    with pytest.raises(PolicyError) as info:
        parse(child.read_text(), str(child))
    err = info.value
    assert err.file == str(tmp_path / "base.kvp")
    assert (err.line, err.column) == (5, 28)
    assert "pool size 4 must be odd" in err.message


def test_conflict_with_a_parent_line_blames_the_childs_line(tmp_path):
    (tmp_path / "base.kvp").write_text(VALID.replace("score l = local(window=32", "score l = local(window=200"))
    child = tmp_path / "child.kvp"
    child.write_text('extends "base.kvp"\npolicy child\nbudget 128 tokens\n')
    with pytest.raises(PolicyError) as info:
        parse(child.read_text(), str(child))
    err = info.value
    assert (err.file, err.line, err.column) == (str(child), 3, 1)
    assert "the observation window (200) is not smaller than the budget (128 tokens)" in err.message


def test_budget_without_unit_hints_at_both_forms():
    with pytest.raises(PolicyError) as info:
        parse("policy x\nbudget 0.05\n")
    assert "'256 tokens'" in info.value.hint and "'2%'" in info.value.hint
