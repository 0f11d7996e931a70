"""What must hold in a serving scheduler between two steps, read from its
state: the radix tree's accounting, no compressed KV in the tree or shared
between requests, and, once idle, nothing held.

Pure functions over plain dicts (what ``/server_info`` reports), so that the
scheduler's own check (:meth:`kvpolicy.sglang_ext.runtime.Runtime.verify`),
the test client (:mod:`kvpolicy.sglang_ext.server`) and the load harness
read the invariants one way. Nothing here imports SGLang or the HTTP client.
"""

from __future__ import annotations


def held_slots(state: dict) -> int:
    """Slots of a :meth:`Server.kv_state` that are neither free nor cached by
    the radix tree: the ones requests hold."""
    return state["max_total_num_tokens"] - state["available_slots"] - state["evictable_slots"] - state["protected_slots"]


def broken_invariants(inv: dict) -> list[str]:
    """What is wrong with the scheduler's ``invariants``
    (:meth:`kvpolicy.sglang_ext.runtime.Runtime.invariants`; empty: nothing):
    the radix tree's accounting, compressed KV in the tree or shared. The
    scheduler's own check (``KVPOLICY_CHECK_INVARIANTS``) and clients use it."""
    if "error" in inv:
        return [f"the server could not check its invariants: {inv['error']}"]
    problems = []
    if inv["tree_slots"] != inv["tree_evictable_plus_protected"]:
        problems.append(f"the tree holds {inv['tree_slots']} slots but counts "
                        f"{inv['tree_evictable_plus_protected']} evictable + protected")
    if inv["compressed_slots_in_tree"]:
        problems.append(f"{inv['compressed_slots_in_tree']} compressed slots are in the radix tree")
    if inv["compressed_slots_shared"]:
        problems.append(f"{inv['compressed_slots_shared']} slots are held by more than one compressed request")
    if inv["compressed_rows_shared"]:
        problems.append(f"{inv['compressed_rows_shared']} rows of the row layout are held twice")
    if inv["compressed_rows_outside_own_slots"]:
        problems.append(f"{inv['compressed_rows_outside_own_slots']} rows of the row layout lie outside "
                        "their request's slots")
    return problems


def invariant_problems(state: dict, *, idle: bool = False) -> list[str]:
    """What is wrong with a :meth:`Server.kv_state` (empty: nothing):
    :func:`broken_invariants`, violations the server's own checks counted;
    with ``idle``, also any slot, record or capture a request still holds."""
    inv = state["invariants"]
    problems = broken_invariants(inv)
    if "error" in inv:
        return problems
    if state["totals"]["invariant_violations"]:
        problems.append(f"the server logged {state['totals']['invariant_violations']} invariant violations")
    if idle:
        if held_slots(state):
            problems.append(f"{held_slots(state)} slots are still held")
        windows = inv.get("decode_windows", 0)
        if state["running"] or inv["captures_pending"] or state["protected_slots"] or windows:
            problems.append(f"still running: {sorted(state['running'])}, captures pending: "
                            f"{inv['captures_pending']}, decode windows: {windows}, "
                            f"protected slots: {state['protected_slots']}")
    return problems
