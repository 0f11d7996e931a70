"""The invariant checks the serving tests and ``bench/load.py`` rely on: each
one must catch the state it is about (no server needed)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from kvpolicy.sglang_ext.server import invariant_problems

HEALTHY_IDLE = {
    "max_total_num_tokens": 1024, "available_slots": 700, "evictable_slots": 324, "protected_slots": 0,
    "running": {}, "totals": {"invariant_violations": 0},
    "invariants": {"tree_slots": 324, "tree_evictable_plus_protected": 324, "compressed_slots": 0,
                   "compressed_slots_in_tree": 0, "compressed_slots_shared": 0, "compressed_rows_shared": 0,
                   "compressed_rows_outside_own_slots": 0, "captures_pending": 0},
}


def broken(path: str, value):
    state = copy.deepcopy(HEALTHY_IDLE)
    *keys, last = path.split(".")
    target = state
    for key in keys:
        target = target[key]
    target[last] = value
    return state


def test_a_healthy_idle_state_has_no_problems():
    assert invariant_problems(HEALTHY_IDLE) == []
    assert invariant_problems(HEALTHY_IDLE, idle=True) == []


@pytest.mark.parametrize("path, value, words", [
    ("invariants.tree_slots", 330, "evictable + protected"),
    ("invariants.compressed_slots_in_tree", 3, "in the radix tree"),
    ("invariants.compressed_slots_shared", 2, "more than one compressed request"),
    ("invariants.compressed_rows_shared", 2, "held twice"),
    ("invariants.compressed_rows_outside_own_slots", 1, "outside their request's slots"),
    ("totals.invariant_violations", 1, "invariant violations"),
])
def test_each_broken_invariant_is_named(path, value, words):
    problems = invariant_problems(broken(path, value))
    assert len(problems) == 1 and words in problems[0]


@pytest.mark.parametrize("path, value, words", [
    ("available_slots", 690, "10 slots are still held"),
    ("running", {"r1": {}}, "still running"),
    ("invariants.captures_pending", 1, "captures pending: 1"),
])
def test_what_an_idle_server_must_not_hold(path, value, words):
    state = broken(path, value)
    assert invariant_problems(state) == []  # fine while requests run
    assert any(words in p for p in invariant_problems(state, idle=True))


def test_an_unchecked_state_is_a_problem():
    state = broken("invariants", {"error": "AttributeError('total_size')"})
    assert invariant_problems(state) == ["the server could not check its invariants: AttributeError('total_size')"]


def test_the_load_harness_places_each_cancel_by_its_events():
    spec = importlib.util.spec_from_file_location("load", Path(__file__).parents[2] / "bench" / "load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    events = [{"rid": "b", "event": "capture"}, {"rid": "b", "event": "released"},
              {"rid": "c", "event": "capture"}, {"rid": "c", "event": "compressed"}, {"rid": "c", "event": "released"},
              {"rid": "d", "event": "capture"}, {"rid": "d", "event": "not_compressed"}]
    assert load.where_cancelled(events, ["a", "b", "c", "d"]) == {
        "queued_or_not_compressible": 1, "during_prefill": 1, "after_compression": 1, "finished_first": 1}
