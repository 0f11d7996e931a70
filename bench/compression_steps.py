"""Where a policy's compression time goes: each step of the compiled plan
(protect, score, allocate, classify, compact; ``Plan.run_order``) timed over
every layer of one prompt, on random inputs of a model's shape (speed needs
no trained weights), on the backend the pipeline picks for the device.

    python bench/compression_steps.py [--policy ems --budget 10% --tokens 4096 --rounds 3]

Defaults: SmolLM2-135M's shape (30 layers, 9 query / 3 KV heads, d = 64).
One warm-up layer, then ``--rounds`` passes over all layers; prints each
step's median seconds per prompt and its share, and writes
``bench/results/compression_steps_<policy>_<tokens>.json``.

Random keys and values are nearly orthogonal, so a ``merge similar(...)``
clause merges (almost) nothing here and its scatter is not timed: the
merged-token count is printed beside the times. The similarity search that
decides it is timed (classify).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from kvpolicy.exec.pipeline import LayerRun, backend_for, compile_pipeline
from kvpolicy.exec.reference.scores import LayerInputs
from kvpolicy.lang import registry
from kvpolicy.lang.budgets import ModelShape

RESULTS = Path(__file__).resolve().parent / "results"


def time_steps(pipe, backend, inputs: LayerInputs, layers: int) -> tuple[dict[str, float], int]:
    """Seconds per step of ``pipe``'s plan on ``backend``, summed over
    ``layers`` layers of ``inputs``, and the tokens the last layer merged."""
    spent = {step: 0.0 for step in pipe.plan.run_order}
    for layer in range(layers):
        run = LayerRun(inputs, layer, pipe.plan.layer_budgets[layer])
        for step in pipe.plan.run_order:
            t = time.perf_counter()
            getattr(pipe, f"_{step}")(run, backend)
            spent[step] += time.perf_counter() - t
    return spent, int(run.out.merged.sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="ems")
    ap.add_argument("--budget", default="10%")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--heads", type=int, nargs=3, default=[9, 3, 64], metavar=("H", "H_KV", "D"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="JSON path (default: bench/results/compression_steps_<policy>_<tokens>.json)")
    args = ap.parse_args(argv)
    H, H_kv, d = args.heads
    N = args.tokens
    policy = registry.load(args.policy)
    if policy.selection is None:
        raise SystemExit(f"{args.policy} compresses nothing: it has no 'per head' selection to time")
    policy = policy.with_budget(args.budget)
    pipe = compile_pipeline(policy, ModelShape(args.layers, H_kv, H, "random"), N)
    torch.manual_seed(0)
    keys, values = torch.randn(H_kv, N, d), torch.randn(H_kv, N, d)
    window = max(pipe.window, 1)
    queries = torch.randn(H, window, d)
    accumulated = torch.rand(H, N) * (N / 64) if pipe.needs_accumulated else None
    inputs = LayerInputs(keys, values, queries, accumulated)
    backend = pipe.backend or backend_for(keys.device)
    time_steps(pipe, backend, inputs, 1)  # warm-up
    rounds, merged = [], 0
    for _ in range(args.rounds):
        spent, merged = time_steps(pipe, backend, inputs, args.layers)
        rounds.append(spent)
    steps = {s: statistics.median(r[s] for r in rounds) for s in pipe.plan.run_order}
    total = statistics.median(sum(r.values()) for r in rounds)
    print(f"{args.policy} at {args.budget}, {N} tokens, {args.layers} layers, heads {H}/{H_kv}, d {d}, "
          f"backend {backend.name}, median of {args.rounds}; tokens merged in a layer: {merged}")
    for s, sec in steps.items():
        print(f"  {s:<9} {sec:7.3f} s  {sec / total:6.1%}")
    print(f"  {'total':<9} {total:7.3f} s  ({1000 * total / args.layers:.1f} ms a layer)")
    out = args.out or RESULTS / f"compression_steps_{args.policy}_{N}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "policy": args.policy, "budget": args.budget, "tokens": N, "layers": args.layers,
        "heads": [H, H_kv, d], "backend": backend.name, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "merged_tokens_per_layer": merged,
        "rounds": rounds, "median_s": steps, "total_s": total}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
