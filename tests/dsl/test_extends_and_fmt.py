"""`extends` (composition in the language) and `kvpolicy fmt` keeping comments."""

from __future__ import annotations

import pytest

from kvpolicy import load
from kvpolicy.dsl import parse, parse_file
from kvpolicy.dsl.formatter import format_source
from kvpolicy.lang import ir
from kvpolicy.lang.errors import PolicyError


def test_extends_shipped_name_overrides_single_lines():
    p = parse("extends snapkv\npolicy snap128\nbudget 128 tokens\n")
    base = load("snapkv")
    assert p.budget == ir.Budget(128, "tokens")
    assert (p.scores, p.selection, p.protect, p.layers) == (base.scores, base.selection, base.protect, base.layers)


def test_pyramidkv_is_snapkv_with_pyramid_layers():
    p, s = load("pyramidkv"), load("snapkv")
    assert p.layers == ir.Pyramid(20.0)
    assert (p.scores, p.selection, p.budget, p.protect) == (s.scores, s.selection, s.budget, s.protect)


def test_extends_path_replaces_a_score_in_place(tmp_path):
    (tmp_path / "base.kvp").write_text(load("ems").to_kvp())
    child = tmp_path / "child.kvp"
    child.write_text('extends "base.kvp"\nscore l = local(window=16, pool=avg(5))\nscore extra = recency()\n')
    p = parse_file(child)
    assert [d.name for d in p.scores] == ["g", "l", "importance", "extra"]
    assert p.score("l") == ir.LocalAttention(16, ir.Pool("avg", 5))
    assert p.name == "ems"


def test_extends_cycle_is_reported(tmp_path):
    (tmp_path / "a.kvp").write_text('extends "b.kvp"\npolicy a\n')
    (tmp_path / "b.kvp").write_text('extends "a.kvp"\npolicy b\nbudget 100%\n')
    with pytest.raises(PolicyError, match="extends itself"):
        parse_file(tmp_path / "a.kvp")


def test_extends_unknown_name_suggests():
    with pytest.raises(PolicyError) as info:
        parse("extends snapvk\npolicy x\n")
    assert info.value.hint == "did you mean 'snapkv'?" and info.value.line == 1


def test_child_layer_override_replaces_parents(tmp_path):
    (tmp_path / "base.kvp").write_text(load("snapkv").to_kvp() + "layer 0-3 budget 100%\n")
    p = parse('extends "base.kvp"\nlayer 2 budget 64 tokens\n', base_dir=tmp_path)
    assert p.overrides == (ir.LayerOverride((0, 1, 3), ir.Budget(100.0, "percent")),
                           ir.LayerOverride((2,), ir.Budget(64, "tokens")))


MESSY = """\
# header comment

budget 2%   # the budget
policy x   # name
# about scores
score g = global()
score l = local(window=8) # local
per head {   # block open
  # keep comment
  keep top g  # trailing keep
  evict rest
  # closing comment
}  # close
layer 3 budget 100%  # l3
# about layer 1
layer 1 budget 100%
layers pyramid(beta=20)
# footer
"""

CANONICAL = """\
# header comment

policy x  # name
budget 2%  # the budget
# about scores
score g = global()
score l = local(window=8)  # local
per head {  # block open
  # keep comment
  keep top g  # trailing keep
  evict rest
  # closing comment
}  # close
layers pyramid(beta=20)
# about layer 1
layer 1, 3 budget 100%  # l3
# footer
"""


def test_fmt_orders_statements_and_keeps_every_comment():
    out = format_source(MESSY)
    assert out == CANONICAL
    assert format_source(out) == out
    assert parse(out) == parse(MESSY)


def test_fmt_keeps_extends_and_does_not_flatten():
    text = "policy p\nextends snapkv\nbudget 128 tokens\n"
    assert format_source(text) == "policy p\nextends snapkv\nbudget 128 tokens\n"


def test_fmt_does_not_copy_comments_across_statements_on_one_line():
    text = ("policy p; budget 256 tokens\n# above\nkeep recent 32; score s = local(window=8)  # pair\n"
            "per head { keep top s ; evict rest   # trailing\n}\n")
    out = format_source(text)
    assert out.count("# above") == 1 and out.count("# pair") == 1 and out.count("# trailing") == 1
    assert "# above\nkeep recent 32\n" in out and "score s = local(window=8)  # pair\n" in out
    assert format_source(out) == out
