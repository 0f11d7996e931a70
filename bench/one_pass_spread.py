"""How much the one attention pass and SGLang's SDPA vary from call to call
on this machine, side by side: ``attention_with_column_sums`` (the pure-torch
reference and the compiled CPU kernel, ``kernels/cpu.py``) and SDPA over the
same 4k rows in the pool's layout (SmolLM2-135M's 9 query / 3 KV heads,
d = 64), alternated ``--calls`` times.

    python bench/one_pass_spread.py [--tokens 4096 --calls 12]

The reference writes each tile's logits and probabilities to memory where
SDPA's flash kernel keeps its tiles in cache, so memory-bandwidth contention
from a neighbour slows it more; the compiled kernel keeps its tiles in L2.
This prints each spread (min, median, max), the median of the call-by-call
ratios over SDPA, and writes ``bench/results/one_pass_spread_<tokens>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvpolicy.exec.reference.attention import attention_with_column_sums
from kvpolicy.kernels import cpu

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=12)
    args = ap.parse_args(argv)
    N, H, H_kv, d = args.tokens, 9, 3, 64
    torch.manual_seed(0)
    q = torch.randn(H, N, d)
    k = torch.randn(N, H_kv, d).transpose(0, 1)  # the pool's [N, H_kv, d] gather, transposed
    v = torch.randn(N, H_kv, d).transpose(0, 1)
    runs = {"one_pass": lambda: attention_with_column_sums(q, k, v, H // H_kv),
            "compiled_one_pass": lambda: cpu.attention_with_column_sums(q, k, v, H // H_kv),
            "sdpa": lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                                           enable_gqa=True)}
    for run in runs.values():  # warm-up: the kernel's first call loads its build
        run()
    seconds = {name: [] for name in runs}
    for _ in range(args.calls):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - t)
    summary = {name: {"min": min(s), "median": statistics.median(s), "max": max(s), "all": s,
                      "over_sdpa": statistics.median(a / b for a, b in zip(s, seconds["sdpa"]))}
               for name, s in seconds.items()}
    for name, s in summary.items():
        print(f"{name:17s} min {s['min']:.3f}s  median {s['median']:.3f}s  max {s['max']:.3f}s  "
              f"max/min {s['max'] / s['min']:.2f}  / sdpa {s['over_sdpa']:.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"one_pass_spread_{N}.json"
    out.write_text(json.dumps({"tokens": N, "heads": [H, H_kv, d], "calls": args.calls, "seconds": summary},
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
