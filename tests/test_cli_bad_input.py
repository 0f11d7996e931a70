"""Bad command-line input: every subcommand answers out-of-range numbers,
empty lists, missing files and wrong types with one line on stderr and a
non-zero exit status, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvpolicy.cli import main

# (argv, exit status, a piece of the one line)
PARSER_ERRORS = [
    (["explain", "ems", "--layers", "0"], 2, "--layers: 0 is below the smallest allowed value, 1"),
    (["explain", "ems", "--kv-heads", "-3"], 2, "--kv-heads: -3 is below"),
    (["explain", "ems", "--q-heads", "many"], 2, "--q-heads: 'many' is not an integer"),
    (["explain", "ems", "--prompt-len", "0"], 2, "--prompt-len: 0 is below"),
    (["explain", "ems", "--prompt-len", "2.5"], 2, "'2.5' is not an integer"),
    (["explain", "ems", "--kv-heads", "3", "--q-heads", "4"], 2, "--q-heads 4 is not a multiple of --kv-heads 3"),
    (["explain", "ems", "--model", ""], 2, "--model: must not be empty"),
    (["explain"], 2, "the following arguments are required: POLICY"),
    (["check"], 2, "the following arguments are required: FILE"),
    (["fmt", "--check"], 2, "the following arguments are required: FILE"),
    (["model", "prepare", "--fast"], 2, "unrecognized arguments: --fast"),
    (["calibrate", "heads", "--lengths"], 2, "--lengths: expected at least one argument"),
    (["calibrate", "heads", "--lengths", "512", "0"], 2, "--lengths: 0 is below"),
    (["calibrate", "heads", "--depths", "1.2"], 2, "--depths: 1.2 is not between 0 and 1"),
    (["calibrate", "heads", "--depths", "deep"], 2, "--depths: 'deep' is not a number"),
    (["calibrate", "heads", "--max-new-tokens", "0"], 2, "--max-new-tokens: 0 is below"),
    (["calibrate", "heads", "--model", "no/such/folder"], 2, "--model: no such folder: 'no/such/folder'"),
    (["calibrate", "layers", "--budget", "0"], 2, "--budget: 0 is below"),
    (["calibrate", "layers", "--length", "-5"], 2, "--length: -5 is below"),
    (["calibrate", "layers", "--prompts", "x"], 2, "--prompts: 'x' is not an integer"),
    (["calibrate", "layers", "--out", ""], 2, "--out: must not be empty"),
    (["eval", "niah", "--lengths"], 2, "--lengths: expected at least one argument"),
    (["eval", "niah", "--lengths", "0"], 2, "--lengths: 0 is below"),
    (["eval", "niah", "--depths", "-0.1"], 2, "--depths: -0.1 is not between 0 and 1"),
    (["eval", "niah", "--needles", "0"], 2, "--needles: 0 is below"),
    (["eval", "niah", "--haystack", "no/such.txt"], 2, "--haystack: no such file: 'no/such.txt'"),
    (["eval", "niah", "--needle", "A cat.", "--answer", "dog"], 2, "--answer 'dog' does not occur in --needle"),
    (["eval", "niah", "--question", " "], 2, "--question: must not be empty"),
    (["eval", "niah", "--policy"], 2, "--policy: expected at least one argument"),
    (["eval", "niah", "--budget"], 2, "--budget: expected at least one argument"),
    (["eval", "niah", "--mode", "sideways"], 2, "--mode: invalid choice: 'sideways'"),
    (["eval", "ppl", "--policy", "snapkv", "--context", "10", "--target", "0"], 2, "--target: 0 is below"),
    (["eval", "ppl", "--context", "0"], 2, "--context: 0 is below"),
    (["eval", "ppl", "--windows", "0"], 2, "--windows: 0 is below"),
    (["eval", "ppl", "--text", "no/such.txt"], 2, "--text: no such file"),
    (["eval", "ppl", "--model", "no/such/folder"], 2, "--model: no such folder"),
    (["eval", "ruler", "--tasks", "bogus"], 2, "--tasks: invalid choice: 'bogus'"),
    (["eval", "ruler", "--samples", "0"], 2, "--samples: 0 is below"),
    (["eval", "ruler", "--length", "long"], 2, "--length: 'long' is not an integer"),
    (["eval", "longbench"], 2, "the following arguments are required: --data"),
    (["eval", "longbench", "--data", "no/such/folder"], 2, "--data: no such folder"),
    (["eval", "longbench", "--data", ".", "--max-length", "1"], 2, "--max-length: 1 is below"),
    (["eval", "longbench", "--data", ".", "--limit", "0"], 2, "--limit: 0 is below"),
    # checked after parsing, before any model loads
    (["explain", "no/such.kvp"], 1, "policy file 'no/such.kvp' not found"),
    (["check", "no/such.kvp"], 1, "policy file 'no/such.kvp' not found"),
    (["fmt", "no/such.kvp"], 1, "policy file 'no/such.kvp' not found"),
    (["eval", "ppl", "--policy", "no/such.kvp"], 1, "no/such.kvp"),
    (["calibrate", "layers", "--policy", "no/such.kvp"], 1, "no/such.kvp"),
]


def _one_line(text: str) -> str:
    """The one line of an error, after any progress bar (loading weights)."""
    lines = [line for line in text.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1, lines
    assert "Traceback" not in text
    return lines[0]


@pytest.mark.parametrize("argv, status, expected", PARSER_ERRORS, ids=[" ".join(a) for a, _, _ in PARSER_ERRORS])
def test_bad_input_is_one_line_and_a_nonzero_status(argv, status, expected, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # the argument parser's exit
        code = exc.code
    out = capsys.readouterr()
    assert code == status, (code, out)
    line = _one_line(out.err)
    assert expected in line, line
    if status == 2:
        assert line.startswith("kvpolicy") and "error:" in line and "--help" in line


def test_a_bad_budget_is_a_located_policy_error(capsys):
    """A budget string is policy text: its error is the parser's, one line
    saying what is wrong, then what was expected and the likely fix."""
    assert main(["eval", "ppl", "--budget", "12 tokns"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines() == ["<policy>: error: budget '12 tokns': unexpected word 'tokns'",
                                "expected one of: '%', 'tokens'", "did you mean 'tokens'?"]


def test_bad_input_found_only_with_the_model_is_one_line_too(tmp_path):
    """A text shorter than context + target: found once the model's
    tokenizer has read it; through the real entry point, as a user runs it."""
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    done = subprocess.run([sys.executable, "-m", "kvpolicy", "eval", "ppl", "--policy", "snapkv",
                           "--text", str(text), "--context", "64", "--target", "8"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    line = _one_line(done.stderr)
    assert "fewer than context + target = 72" in line, line
