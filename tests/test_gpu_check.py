"""``make gpu-check``'s script starts and measures something: its tiny mode
on the CPU (interpreted kernels, a toy random-weight Llama), in a subprocess
so that Triton's interpreter mode is set before Triton is first imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kvpolicy", ["installed", "checkout"])
def test_the_gpu_check_runs_in_its_tiny_mode(tmp_path, kvpolicy):
    """Installed, and from a plain checkout as on the device machine (where
    nothing is installed: ``-S`` skips the editable install's finder, torch
    still comes from site-packages)."""
    import torch

    flags, env = [], dict(os.environ)
    if kvpolicy == "checkout":
        flags, env["PYTHONPATH"] = ["-S"], str(Path(torch.__file__).resolve().parent.parent)
    run = subprocess.run([sys.executable, *flags, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--policy", "ems",
                          "snapkv", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=900,
                         env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_check_*.json")
    report = json.loads(path.read_text())
    steps = report["steps"]
    assert report["device"] == "cpu" and report["tiny"] is True and report["kvpolicy"] == kvpolicy
    assert "skipped" in steps["kernel_tests"] and "skipped" in steps["flashinfer_decode"]
    bench = steps["kernel_bench"]
    assert bench["mode"] == "interpreted" and bench["results"]
    assert all(r["kernel_s"] > 0 and r["max_abs_diff"] is not None and r["max_abs_diff"] < 1e-2
               for r in bench["results"] if r["reference_s"] is not None)
    hf = steps["transformers_path"]
    assert hf["plain_prefill_s"] > 0 and [r["policy"] for r in hf["rows"]] == ["ems", "snapkv"]
    ems, snapkv = hf["rows"]
    assert ems["accumulated_attention"] and not snapkv["accumulated_attention"]
    assert all(r["capture_prefill_s"] > 0 and r["compression_s"] > 0 for r in hf["rows"])
