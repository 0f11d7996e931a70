"""What an operator runs the server with: Prometheus metrics through SGLang's
``--enable-metrics``, and a folder of policies requests may pick by name
(``--kv-policy-dir``), checked at launch."""

from __future__ import annotations

import re
import urllib.request
from types import SimpleNamespace

import pytest

from kvpolicy.sglang_ext import launch

from .conftest import FOLDER_POLICIES
from .helpers import assert_healthy, chat_ids, hay


def scrape(server) -> dict[str, float]:
    """``kvpolicy:*`` samples of ``/metrics``, by name with labels."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=60) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("kvpolicy:"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


def test_metrics_count_compressed_and_exact_requests(ems_server, tokenizer):
    before = scrape(ems_server)
    ids = chat_ids(tokenizer, hay(tokenizer, 500, offset=70000) + "\n\nWhat is this text about?")
    reply = ems_server.generate(ids, 4, rid="metrics-compressed")
    # a budget larger than the prompt: nothing to compress
    exact = ems_server.generate(ids, 4, rid="metrics-short", custom_params={"kv_budget": "4096"})
    full = ems_server.generate(ids, 4, rid="metrics-full", custom_params={"kv_policy": "full"})
    assert "text" in reply and "text" in exact and "text" in full
    (event,) = [e for e in ems_server.events("metrics-compressed") if e["event"] == "compressed"]
    after = scrape(ems_server)
    grew = {k: after[k] - before.get(k, 0.0) for k in after}
    assert total(grew, 'kvpolicy:requests_compressed_total{layout="rank-slot",policy="ems10"}') == 1, grew
    assert total(grew, 'kvpolicy:prompt_tokens_total{policy="ems10"}') == len(ids)
    assert total(grew, 'kvpolicy:slots_kept_total{policy="ems10"}') == event["slots_kept"]
    assert total(grew, 'kvpolicy:slots_freed_total{policy="ems10"}') \
        + total(grew, 'kvpolicy:slots_released_to_tree_total{policy="ems10"}') == len(ids)
    assert total(grew, 'kvpolicy:compression_seconds_count{policy="ems10"}') == 1
    assert total(grew, 'kvpolicy:compression_seconds_sum{policy="ems10"}') == pytest.approx(event["seconds"], abs=1e-3)
    assert total(grew, 'kvpolicy:requests_left_exact_total{reason="no_selection"}') == 1  # the full one
    assert total(grew, 'kvpolicy:requests_left_exact_total{reason="within_budget"}') == 1  # the 4096-token budget
    assert_healthy(ems_server, tokenizer)


def test_metrics_count_recompressions_during_decoding(ems_server, tokenizer):
    """A decode trigger's recompressions (the folder's ``rolling``: 96 slots,
    every 16 tokens) are counted as they happen, with the slots they freed
    and their seconds, equal to the request's ``recompressed`` events."""
    before = scrape(ems_server)
    ids = chat_ids(tokenizer, hay(tokenizer, 300, offset=72000) + "\n\nWrite a long story about it.")
    reply = ems_server.generate(ids, 64, rid="metrics-rolling", custom_params={"kv_policy": "rolling"},
                                ignore_eos=True)
    assert "text" in reply, reply
    checks = [e for e in ems_server.events("metrics-rolling") if e["event"] == "recompressed"]
    assert len(checks) >= 2, checks
    grew = {k: v - before.get(k, 0.0) for k, v in scrape(ems_server).items()}
    assert total(grew, 'kvpolicy:decode_compressions_total{policy="rolling"}') == len(checks)
    assert total(grew, 'kvpolicy:decode_slots_freed_total{policy="rolling"}') == sum(e["freed"] for e in checks) > 0
    assert total(grew, 'kvpolicy:decode_compression_seconds_count{policy="rolling"}') == len(checks)
    assert total(grew, 'kvpolicy:decode_compression_seconds_sum{policy="rolling"}') == pytest.approx(
        sum(e["seconds"] for e in checks), abs=1e-3 * len(checks))
    assert total(grew, 'kvpolicy:requests_compressed_total{layout="rank-slot",policy="rolling"}') == 1  # at prefill
    assert_healthy(ems_server, tokenizer)


def test_requests_pick_policies_from_the_operators_folder(ems_server, tokenizer):
    ids = chat_ids(tokenizer, hay(tokenizer, 600, offset=71000) + "\n\nWhat is this text about?")
    for name in FOLDER_POLICIES:
        reply = ems_server.generate(ids, 4, rid=f"folder-{name}", custom_params={"kv_policy": name})
        assert "text" in reply, reply
        (event,) = [e for e in ems_server.events(f"folder-{name}") if e["event"] == "compressed"]
        assert event["layout"] == ("rows" if name == "layered" else "rank-slot")
    assert ems_server.kv_state()["policy"] == "ems10"
    bad = ems_server.generate(ids, 4, custom_params={"kv_policy": "tigth"})
    assert bad["status"] == 400 and "tight" in bad["error"] and "policy folder" in bad["error"]
    files = ems_server.generate(ids, 4, custom_params={"kv_policy": "tight.kvp"})
    assert files["status"] == 400  # names, never paths
    assert_healthy(ems_server, tokenizer)


@pytest.mark.parametrize("files, expected", [
    ({"good.kvp": "policy good\nextends snapkv\n", "bad.kvp": "policy bad\nbudget 10 tokns\n"}, "bad.kvp:2"),
    ({"snapkv.kvp": "policy snapkv\nextends h2o\n"}, "would shadow the shipped policy"),
    ({}, "no .kvp files"),
    ({"loop.kvp": "policy loop\nextends adakv\ntrigger prefill, every 64 tokens\n"}, "recompresses during decoding"),
])
def test_a_bad_policy_folder_stops_the_launch(tmp_path, capsys, monkeypatch, files, expected):
    monkeypatch.setenv(launch.ENV_POLICY, "restored after the test")
    monkeypatch.delenv(launch.ENV_POLICY_DIR, raising=False)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as exit_:
        launch.prepare(["--kv-policy", "snapkv", "--kv-policy-dir", str(tmp_path)], SimpleNamespace())
    assert exit_.value.code == 2 and expected in capsys.readouterr().err


def test_a_folder_alone_serves_exact_by_default_and_its_policies_by_name(tmp_path, monkeypatch):
    for key in (launch.ENV_POLICY, launch.ENV_POLICY_IR, launch.ENV_POLICY_DIR):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "mine.kvp").write_text("policy mine\nextends adakv\nbudget 12%\n")
    args = SimpleNamespace(page_size=1, disable_overlap_schedule=False, device="cuda", disable_cuda_graph=False)
    try:
        launch.prepare(["--kv-policy-dir", str(tmp_path)], args)
        from kvpolicy.lang import wire

        assert wire.loads(launch.os.environ[launch.ENV_POLICY_IR]).name == "full"
        assert args.disable_cuda_graph is True  # mine.kvp pools its heads: the row layout, outside CUDA graphs
        default = wire.loads(launch.os.environ[launch.ENV_POLICY_IR])
        assert launch.request_policy(default, {"kv_policy": "mine"}).name == "mine"
        assert launch.request_policy(default, {}).name == "full"
        with pytest.raises(Exception, match="mine"):
            launch.request_policy(default, {"kv_policy": "nope"})
    finally:
        for key in (launch.ENV_POLICY, launch.ENV_POLICY_IR, launch.ENV_POLICY_DIR):
            launch.os.environ.pop(key, None)


def test_a_graph_replaying_server_refuses_row_layout_requests():
    """On CUDA with graphs on (an equal-budget launch policy), a request naming
    a per-head policy gets a 400 saying how to serve it."""
    with pytest.raises(Exception, match="disable-cuda-graph"):
        launch.request_policy(launch.load("snapkv"), {"kv_policy": "adakv"}, cuda_graphs=True)
    assert launch.request_policy(launch.load("snapkv"), {"kv_policy": "h2o"}, cuda_graphs=True).name == "h2o"


def test_a_graph_replaying_server_turns_graphs_off_for_a_decode_trigger():
    """A decode trigger reads each decode step's queries in Python, which a
    replayed CUDA graph skips: a launch policy with one turns graphs off; a
    request naming one on a graph-replaying server gets a 400."""
    with pytest.raises(Exception, match="disable-cuda-graph"):
        launch.request_policy(launch.load("snapkv"), {"kv_policy": "rkv"}, cuda_graphs=True)
    assert launch.request_policy(launch.load("snapkv"), {"kv_policy": "rkv"}).name == "rkv"
    args = SimpleNamespace(page_size=1, disable_overlap_schedule=False, device="cuda", disable_cuda_graph=False)
    changed = launch.check_server_args(args, launch.load("rkv"))
    assert args.disable_cuda_graph is True and "decode trigger" in changed[0], changed


def test_every_shipped_policy_is_servable():
    for name in launch.shipped_names():
        launch.servable(launch.load(name))
    assert re.search("compresskv", launch.HELP)


def test_cores_are_split_between_data_parallel_schedulers():
    from kvpolicy.sglang_ext.launch_server import core_split

    assert core_split(2, 2) == "0|1"
    assert core_split(16, 2) == "0-7|8-15"
    assert core_split(1, 2) == "0|0"  # one core: both share it


@pytest.mark.serve
@pytest.mark.slow
def test_data_parallel_schedulers_each_compress_in_their_own_pool(model_dir, tokenizer, tmp_path):
    """``--dp-size 2``: two schedulers, each with its own pool, radix tree and
    kvpolicy runtime; SGLang spreads the requests over them; each compresses
    its own and holds nothing once idle (strict checks on in both)."""
    from kvpolicy.sglang_ext import server as srv
    from kvpolicy.sglang_ext.server import invariant_problems

    policy = tmp_path / "snap10.kvp"
    policy.write_text("policy snap10\nextends snapkv\nbudget 10%\n")
    server = srv.start(model_dir, tmp_path / "server.log", policy=str(policy), env=srv.STRICT_CHECKS,
                       extra=["--max-total-tokens", "4096", "--max-running-requests", "4", "--sleep-on-idle",
                              "--dp-size", "2"])
    try:
        ranks = set()
        for i in range(4):
            ids = chat_ids(tokenizer, hay(tokenizer, 600, offset=80000 + 1000 * i) + "\n\nWhat is this text about?")
            reply = server.generate(ids, 8, rid=f"dp-{i}")
            assert reply["meta_info"]["completion_tokens"] == 8, reply
            ranks.add(reply["meta_info"].get("dp_rank"))
        states = server.kv_states()
        assert len(states) == 2 and ranks == {0, 1}
        compressed = [s["totals"]["requests_compressed"] for s in states]
        assert sum(compressed) == 4 and min(compressed) >= 1, compressed
        for state in states:
            assert state["policy"] == "snap10"
            assert not invariant_problems(state, idle=True), invariant_problems(state, idle=True)
    finally:
        server.stop()
