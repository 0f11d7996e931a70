"""``bench/compression_steps.py`` runs and its per-step times add up to its total."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("compression_steps", ROOT / "bench" / "compression_steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("policy", ["ems", "snapkv"])
def test_compression_steps_times_every_step_of_the_plan(tmp_path, policy):
    out = tmp_path / "steps.json"
    assert _bench().main(["--policy", policy, "--tokens", "256", "--layers", "2", "--rounds", "1",
                          "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["median_s"]) == ["protect", "score", "allocate", "classify", "compact"]
    assert all(sec >= 0 for sec in result["median_s"].values())
    assert result["total_s"] == pytest.approx(sum(result["rounds"][0].values()))
    assert result["backend"] in ("cpu", "reference")


def test_a_policy_without_selection_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="compresses nothing"):
        _bench().main(["--policy", "full", "--tokens", "64", "--layers", "1", "--out", str(tmp_path / "x.json")])
