"""`kvpolicy check | fmt | explain`, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvpolicy.cli import main
from kvpolicy.compile.compiler import STAGES
from kvpolicy.lang.registry import shipped_path
from tests.conftest import VALID

POLICIES = sorted(str(p) for p in Path(shipped_path("ems")).parent.glob("*.kvp"))


def test_check_all_shipped_policies(capsys):
    assert main(["check", *POLICIES]) == 0
    out = capsys.readouterr().out
    assert out.count("ok  ") == len(POLICIES) == 10


def test_check_reports_errors_and_exits_1(tmp_path, capsys):
    bad = tmp_path / "bad.kvp"
    bad.write_text(VALID.replace("global(norm=mean)", "slobal()"))
    good = tmp_path / "good.kvp"
    good.write_text(VALID)
    assert main(["check", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:4:11: error: unknown score function 'slobal'" in err
    assert "did you mean 'global'?" in err


def test_check_missing_file(capsys):
    assert main(["check", "no/such.kvp"]) == 1
    assert "policy file 'no/such.kvp' not found" in capsys.readouterr().err


def test_fmt_check_and_rewrite(tmp_path, capsys):
    path = tmp_path / "p.kvp"
    path.write_text("budget 256 tokens   # b\npolicy p\nscore s = local(window=8)\nper head { keep top s }\n")
    assert main(["fmt", "--check", str(path)]) == 1
    assert "+  evict rest" in capsys.readouterr().out
    assert main(["fmt", str(path)]) == 0
    assert path.read_text() == ("policy p\nbudget 256 tokens  # b\nscore s = local(window=8)\n"
                                "per head {\n  keep top s\n  evict rest\n}\n")
    assert main(["fmt", "--check", str(path)]) == 0
    assert main(["fmt", "--check", *POLICIES]) == 0
    capsys.readouterr()
    assert main(["fmt", "--stdout", str(path)]) == 0  # canonical already: still printed
    assert capsys.readouterr().out == path.read_text()


def test_explain_shows_decode_trigger_and_protected_floor(tmp_path, capsys):
    path = tmp_path / "p.kvp"
    path.write_text("extends snapkv\npolicy p\nbudget 1%\ntrigger prefill, every 128 tokens\n")
    assert main(["explain", str(path), "--prompt-len", "1000"]) == 0
    out = capsys.readouterr().out
    assert "1% of the prompt -> B = 10 tokens per KV head per layer for a 1000-token prompt, raised to the 32 protected tokens" in out
    assert "trigger after prefill; every 128 decoded tokens once over budget" in out


def test_explain_refuses_a_window_larger_than_a_layer_budget(tmp_path, capsys):
    path = tmp_path / "p.kvp"
    path.write_text("policy p\nbudget 1%\nkeep sink 4, recent 64\nscore s = local(window=128)\nper head { keep top s }\n")
    assert main(["explain", str(path), "--prompt-len", "4096"]) == 1
    assert "layer 0 keeps 68 tokens, fewer than the observation window (128 queries)" in capsys.readouterr().err


def test_explain_ems_on_the_default_model(capsys):
    assert main(["explain", POLICIES[POLICIES.index(str(shipped_path("ems")))]]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct: 30 layers, 9 query heads, 3 KV heads" in out
    assert "2% of the prompt -> B = 82 tokens per KV head per layer for a 4096-token prompt" in out
    assert "trigger after prefill" in out
    for stage in STAGES:  # EMS uses every stage
        assert f". {stage}" in out
    assert out.count("  82  82 82 82") == 30
    assert "kept    7380 of 368640 token slots (2.0% of the full cache); mean layer budget 82.0 tokens" in out


def test_explain_custom_shape(capsys):
    assert main(["explain", "pyramidkv", "--layers", "4", "--kv-heads", "2", "--prompt-len", "1000"]) == 0
    out = capsys.readouterr().out
    assert "4 layers, 6 query heads, 2 KV heads" in out
    assert "      0     469  469 469" in out and "      3      43  43 43" in out


def test_explain_compresskv_uses_the_models_artifacts(capsys):
    assert main(["explain", "compresskv"]) == 0  # the default model's artifacts are shipped
    out = capsys.readouterr().out
    assert "only each layer's top 4 retrieval heads vote" in out
    assert "kept    23040 of 368640 token slots (6.2% of the full cache); mean layer budget 256.0 tokens" in out
    assert main(["explain", "compresskv", "--model", "Other-Model-7B"]) == 1
    assert "artifact 'other-model-7b.layers.json' not found" in capsys.readouterr().err


def test_console_script_and_module_entry_point():
    exe = Path(sys.executable).parent / "kvpolicy"
    assert exe.exists(), "pip install -e . installs the 'kvpolicy' console script"
    out = subprocess.run([str(exe), "check", "-q", *POLICIES], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-m", "kvpolicy", "explain", "snapkv"], capture_output=True, text=True)
    assert out.returncode == 0 and "policy snapkv" in out.stdout
    out = subprocess.run([sys.executable, "-m", "kvpolicy", "explain"], capture_output=True, text=True)
    assert out.returncode == 2 and "error: the following arguments are required: POLICY" in out.stderr
