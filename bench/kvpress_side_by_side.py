"""kvpolicy beside kvpress, the library users would pick instead: the same
model, the same NIAH prompts, the same budgets, both modes, one table.

kvpress 0.5.5 needs ``transformers<5.3``; kvpolicy pins a newer one, so
kvpress runs in its own environment, ``.venv-kvpress`` (made on first use
from the package registry: torch at our pin, kvpress and what it requires).
This script builds the prompts once (:mod:`kvpolicy.eval.evaluate`'s NIAH prompts
with the sweep's two needles), runs kvpolicy's policies here and kvpress's
presses there (``bench/kvpress_worker.py``), and prints both.

The budget is the share of the prompt kept: kvpolicy's ``budget B%`` per KV
head per layer, kvpress's ``compression_ratio = 1 - B``. Query-aware: the
question is compressed with the context (kvpress: the press is active during
the prefill of context + question); context-only: the question is fed after
compression (kvpress's own pipeline protocol).

    .venv/bin/python bench/kvpress_side_by_side.py                 # 2k, 5 depths, 10/25/50 %, query-aware
    .venv/bin/python bench/kvpress_side_by_side.py --modes query-aware context-only

Writes ``bench/results/kvpress_side_by_side.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENV = ROOT / ".venv-kvpress"
KVPRESS = "kvpress==0.5.5"
TORCH = "torch==2.13.0"  # the Makefile's pin: the registry's CPU build

# kvpolicy policy -> the kvpress press it is compared with (worker names)
PAIRS = {"snapkv": "snapkv", "streamingllm": "streamingllm", "adakv": "adakv", "knorm": "knorm"}
KNORM = """policy knorm
description "Knorm (Devoto et al., arXiv 2406.11430): keep the keys of lowest L2 norm"
budget 10%
score s = -key_norm()
per head {
  keep top s
  evict rest
}
"""
SNAPKV_W64 = """policy snapkv_w64
description "snapkv with kvpress's observation window of 64 queries"
extends snapkv
score s = local(window=64, pool=avg(5))
"""


def ensure_env(python: str) -> Path:
    """``.venv-kvpress`` with kvpress installed (once); its python."""
    py = ENV / "bin" / "python"
    stamp = ENV / ".installed"
    if stamp.is_file():
        return py
    print(f"making {ENV.name} (torch, {KVPRESS}; a few minutes, once)", flush=True)
    subprocess.run([python, "-m", "venv", str(ENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [TORCH], check=True)
    subprocess.run(pip + [KVPRESS, "transformers<5.3"], check=True)
    stamp.touch()
    return py


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048], help="prompt lengths (default 2048)")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--budgets", nargs="+", default=["10%", "25%", "50%"], help="shares kept (default 10%% 25%% 50%%)")
    ap.add_argument("--modes", nargs="+", default=["query-aware"],
                    choices=["query-aware", "context-only"])
    ap.add_argument("--extra", nargs="*", default=["spankv", "ems", "compresskv"],
                    help="kvpolicy policies run beside the pairs (default spankv ems compresskv)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", default=str(HERE / "results" / "kvpress_side_by_side.json"))
    args = ap.parse_args(argv)

    from kvpolicy.dsl.parser import parse
    from kvpolicy.eval import evaluate as ev
    from kvpolicy.eval.sweep import NEEDLES
    from kvpolicy.hf.models import default_model_dir, load_model
    from kvpolicy.lang.combinators import Policy
    from kvpolicy.lang.compose import as_budget
    from kvpolicy.lang.registry import load

    kv_python = ensure_env(sys.executable)
    lm, tok, shape = load_model()
    cases = []
    for length in args.lengths:
        for depth in args.depths:
            for k, spec in enumerate(NEEDLES):
                ctx, q = ev.niah_prompt(tok, spec, length, depth, offset=1000 + 7919 * k)
                cases.append(ev.Case(ctx, q, (spec.answer,), {"length": length, "depth": depth, "needle": k}))

    ours = {name: (Policy.of(parse(KNORM, "<knorm>")) if name == "knorm" else load(name)) for name in PAIRS}
    ours["snapkv_w64"] = Policy.of(parse(SNAPKV_W64, "<snapkv_w64>"))
    ours.update({name: load(name) for name in args.extra})
    batch = [ev.Entry("full", load("full"))]
    batch += [ev.Entry(f"{n}@{b}", p.with_budget(as_budget(b))) for n, p in ours.items() for b in args.budgets]
    t0 = time.perf_counter()
    records = ev.run_cases(lm, tok, shape, batch, cases, modes=tuple(args.modes), max_new_tokens=args.max_new_tokens,
                           desc="kvpolicy")
    ours_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        out = Path(tmp) / "out.json"
        job.write_text(json.dumps({
            "model": str(default_model_dir()), "presses": sorted(set(PAIRS.values())),
            "ratios": {b: 1 - as_budget(b).amount / 100 for b in args.budgets}, "modes": args.modes,
            "max_new_tokens": args.max_new_tokens,
            "cases": [{"context": c.context, "question": c.question, "expected": c.expected[0], **c.meta}
                      for c in cases]}))
        t0 = time.perf_counter()
        subprocess.run([str(kv_python), str(HERE / "kvpress_worker.py"), str(job), str(out)], check=True)
        theirs_s = time.perf_counter() - t0
        result = json.loads(out.read_text())

    def found(rows, label, mode):
        hits = [r["correct"] for r in rows if r["policy"] == label and r["mode"] == mode]
        return f"{sum(hits)}/{len(hits)}" if hits else "-"

    n = len(cases)
    print(f"\nNIAH found, of {n} cases ({len(args.lengths)} lengths x {len(args.depths)} depths x "
          f"{len(NEEDLES)} needles), default model; kvpress {result['version']}, transformers "
          f"{result['transformers']}\n")
    cols = [(m, b) for m in args.modes for b in args.budgets]
    head = "| policy | library | " + " | ".join(f"{'QA' if m == 'query-aware' else 'CO'} {b}" for m, b in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    lines.append("| full cache | kvpolicy | " + " | ".join(found(records, "full", m) for m, _ in cols) + " |")
    lines.append("| full cache | kvpress | " + " | ".join(found(result["cases"], "full", m) for m, _ in cols) + " |")
    for name in ours:
        lines.append(f"| {name} | kvpolicy | " + " | ".join(found(records, f"{name}@{b}", m) for m, b in cols) + " |")
        if name in PAIRS:
            press = PAIRS[name]
            lines.append(f"| {press} | kvpress | "
                         + " | ".join(found(result["cases"], f"{press}@{b}", m) for m, b in cols) + " |")
    print("\n".join(lines))
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({
        "args": {**vars(args), "out": out_path.name}, "kvpress": result["version"],
        "kvpress_transformers": result["transformers"], "seconds": {"kvpolicy": ours_s, "kvpress": theirs_s},
        "table": lines, "kvpolicy_policies": {n: p.to_kvp() for n, p in ours.items()},
        "kvpolicy_cases": records, "kvpress_cases": result["cases"]}, indent=1) + "\n")
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
