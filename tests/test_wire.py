"""The IR as JSON (kvpolicy.lang.wire) and the hand-off of policies to SGLang's
schedulers (kvpolicy.sglang_ext.handoff): every policy survives the trip, a
client cannot smuggle one in, and a request whose policy was not resolved by
the HTTP process is refused rather than served under the wrong policy."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from kvpolicy.lang import ir, wire
from kvpolicy.lang.errors import PolicyError
from kvpolicy.lang.registry import load, shipped_names
from kvpolicy.sglang_ext import handoff
from tests.strategies import policies


@pytest.mark.parametrize("name", shipped_names())
def test_every_shipped_policy_round_trips(name):
    p = load(name)
    back = wire.loads(wire.dumps(p))
    assert back == p and type(back) is ir.Policy


@settings(max_examples=60, deadline=None)
@given(policies())
def test_generated_policies_round_trip(p):
    assert wire.loads(wire.dumps(p)) == p


@pytest.mark.parametrize("text, message", [
    ('{"_": "Popen", "args": ["ls"]}', "not an IR class: 'Popen'"),
    ('{"_": "Budget", "amount": 5, "unit": "tokens"}', "does not hold a policy"),
    ('{"_": "Budget", "value": 5}', "bad fields for Budget"),
])
def test_only_ir_classes_are_decoded(text, message):
    with pytest.raises(ValueError, match=message):
        wire.loads(text)


def test_the_scheduler_runs_the_policy_the_http_process_attached():
    server = load("ems")
    assert handoff.request_policy(server, None) is server
    assert handoff.request_policy(server, {"other": 1}) is server
    custom = {"kv_policy": "snapkv", "kv_budget": "64"}
    handoff.attach(custom, load("snapkv").with_budget(64))
    assert handoff.request_policy(server, custom) == load("snapkv").with_budget(64)


def test_a_named_policy_without_its_resolution_is_refused():
    with pytest.raises(PolicyError, match="was not resolved by the HTTP server"):
        handoff.request_policy(load("ems"), {"kv_policy": "snapkv"})
