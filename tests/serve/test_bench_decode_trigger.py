"""``bench/decode_trigger.py`` runs end to end on a real server (a tiny
configuration: 96 slots, a check every 16 tokens, 80 new tokens), and what
it reports holds together: the trigger keeps the request's slots well below
the full cache's, the full cache agrees with itself, perplexities are finite."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest


@pytest.mark.serve
def test_the_decode_trigger_bench_runs(tmp_path, capsys):
    path = Path(__file__).parents[2] / "bench" / "decode_trigger.py"
    spec = importlib.util.spec_from_file_location("bench_decode_trigger", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "dt.json"
    assert bench.main(["--policy", "snapkv", "--budget", "96", "--every", "16", "--prompt-len", "150",
                       "--max-tokens", "80", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    full, prefill_only, trigger = data["rows"]
    assert [r["label"] for r in data["rows"]] == ["full cache", "prefill only", "with trigger"]
    assert full["agree_before_first_difference"] == full["tokens"] == 80
    assert full["recompressions"] == prefill_only["recompressions"] == 0 and trigger["recompressions"] >= 3
    assert trigger["prompt_slots_kept"] == prefill_only["prompt_slots_kept"] == 96
    assert trigger["most_slots_at_a_check"] <= 96 + 16 + 1
    assert trigger["peak_slots_in_use"] < full["peak_slots_in_use"]
    assert all(math.isfinite(r["continuation_ppl_under_full_model"]) for r in data["rows"])
    assert "ratio with trigger" in capsys.readouterr().out
