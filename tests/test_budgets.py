"""Layer and head budgets, hand-computed."""

from __future__ import annotations

import pytest

import kvpolicy as kp
from kvpolicy.compile.compiler import plan
from kvpolicy.lang import ir
from kvpolicy.lang.budgets import ModelShape, adaptive, layer_budgets, proportional, pyramid
from kvpolicy.lang.errors import PolicyError
from tests.conftest import layers_artifact

SHAPE4 = ModelShape(num_layers=4, num_kv_heads=2, num_q_heads=6)


def test_pyramid_four_layers_by_hand():
    # B=256, w=32, L=4, T=1000, beta=20: c=224, min=224//20=11, max=448-11=437,
    # step=(437-11)//3=142 -> 437, 295, 153, 11, each + w
    assert pyramid(256, 32, 4, 1000, 20) == [469, 327, 185, 43]
    assert layer_budgets(kp.pyramidkv(budget=256), SHAPE4, 1000) == (469, 327, 185, 43)


def test_pyramid_clips_the_top_to_the_prompt():
    # B=256, w=32, T=300: max=437 > T-w=268 -> max=268, min=448-268=180, step=(268-180)//3=29
    assert pyramid(256, 32, 4, 300, 20) == [300, 271, 242, 213]


def test_uniform_percent_with_floor_and_cap():
    p = kp.ems(budget="2%")
    assert layer_budgets(p, SHAPE4, 4096) == (82,) * 4  # round(0.02 * 4096)
    floored = p.with_budget(ir.Budget(2.0, "percent", floor=100))
    assert layer_budgets(floored, SHAPE4, 4096) == (100,) * 4
    capped = p.with_budget(ir.Budget(2.0, "percent", cap=64))
    assert layer_budgets(capped, SHAPE4, 4096) == (64,) * 4


def test_protected_tokens_are_a_floor():
    # 2% of 1000 = 20 tokens, but sink 4 + recent 32 are always kept
    assert layer_budgets(kp.ems(budget="2%"), SHAPE4, 1000) == (36,) * 4


def test_budget_at_or_above_the_prompt_keeps_everything():
    assert layer_budgets(kp.snapkv(budget=256), SHAPE4, 200) == (200,) * 4
    pl = plan(kp.snapkv(budget=256), SHAPE4, 200)
    assert not pl.compresses


def test_explicit_list_scaled_to_the_mean():
    p = kp.snapkv(budget=100).with_layers(kp.explicit([1, 1, 2, 4]))
    assert layer_budgets(p, SHAPE4, 4096) == (50, 50, 100, 200)
    assert sum(proportional([1, 1, 1], 100)) == 100
    with pytest.raises(PolicyError, match="has 3 entries but the model has 4 layers"):
        layer_budgets(p.with_layers(kp.explicit([1, 2, 3])), SHAPE4, 4096)


def test_adaptive_sums_to_the_total_and_respects_floor_and_cap():
    # L=4, B=64, m=32: 32 + round(share * 128) = 122, 58, 45, 32 (sum 257);
    # one -1 step to the lowest-share layer above the floor (layer 2)
    assert adaptive([0.7, 0.2, 0.1, 0.0], 64) == [122, 58, 44, 32]
    # L=30, B=64: layer 0 would get 32 + 0.5 * 960 = 512 > 3B -> capped at 192;
    # the shortfall goes +1 at a time to the highest-share layers below the cap
    shares = [0.5] + [0.5 / 29] * 29
    out = adaptive(shares, 64)
    assert out[0] == 192 and sum(out) == 30 * 64 and all(32 <= b <= 192 for b in out)


def test_adaptive_reads_the_artifact(tmp_path, write_json):
    write_json("m.layers.json", layers_artifact([0.4, 0.3, 0.2, 0.1]))
    p = kp.snapkv(budget=64).with_layers(kp.adaptive(str(tmp_path / "m.layers.json")))
    budgets = layer_budgets(p, SHAPE4, 4096)
    assert sum(budgets) == 4 * 64 and budgets[0] > budgets[3]
    wrong = ModelShape(num_layers=5, num_kv_heads=2, num_q_heads=6)
    with pytest.raises(PolicyError, match="has 4 layers, the model has 5"):
        layer_budgets(p, wrong, 4096)


def test_adaptive_without_path_needs_the_model_artifact():
    p = kp.snapkv(budget=64).with_layers(kp.adaptive())
    with pytest.raises(PolicyError, match="model must be named"):
        layer_budgets(p, SHAPE4, 4096)
    with pytest.raises(PolicyError, match="artifact 'no-such-model.layers.json' not found"):
        layer_budgets(p, ModelShape(4, 2, 6, name="No-Such-Model"), 4096)


def test_overrides_replace_scheduled_layers():
    p = kp.snapkv(budget=64).with_override([0, 1], "100%").with_override(3, 40)
    assert layer_budgets(p, SHAPE4, 1000) == (1000, 1000, 64, 40)
    with pytest.raises(PolicyError, match="model has only 4 layers"):
        layer_budgets(kp.snapkv(budget=64).with_override(9, "100%"), SHAPE4, 1000)


def test_pooled_head_budgets_in_the_plan():
    pl = plan(kp.adakv(budget=256), ModelShape(2, 3, 9), 2048)
    # c = 256 - 32 = 224; floor = 32 + floor(0.2 * 224) = 76; the rest 768 - 2*76 = 616
    assert pl.head_budgets(0) == "76..616 (sum 768)"


def test_model_shape_checks_gqa():
    assert ModelShape(30, 3, 9).group_size == 3
    with pytest.raises(PolicyError, match="do not split evenly"):
        ModelShape(30, 3, 10)
