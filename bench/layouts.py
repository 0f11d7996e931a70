"""What each way of laying out variable budgets in SGLang's pool would hold,
measured on the tokens every shipped policy really keeps.

    python bench/layouts.py                      # 2048-token prompt, budgets 2% 5% 10% 25%
    python bench/layouts.py --prompt-len 4096 --budgets 2% 10%

One prefill of a haystack prompt on the embedded model (query-aware: the
question is part of the prompt), then every shipped policy compresses that
capture; the per-(layer, KV head) counts it keeps give the slots one request
would hold for its prompt under the three designs of ARCHITECTURE.md §
Variable budgets:

* **rows** (built): one row per (layer, KV head) per slot, any row of the
  request's slots holds any of its tokens: ``ceil(sum counts / (L * H_kv))``;
* **per-layer classes** (SGLang's sliding-window sub-pools generalised, one
  class per distinct layer budget, the ideal with no rounding into classes):
  a layer's heads still share slots, so layer ``l`` needs ``max_h counts``;
  the request holds the mean over layers of that;
* **right-aligned rank slots**: every layer reads a suffix of one slot list,
  so the request holds ``max over layers and heads``.

The uncompressed prompt (``N`` slots) is the reference. Prints one table and
writes ``bench/results/layouts_<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens (default: 2048)")
    ap.add_argument("--budgets", nargs="+", default=["2%", "5%", "10%", "25%"],
                    help="budgets to apply to every policy (default: 2%% 5%% 10%% 25%%)")
    ap.add_argument("--out", type=Path, help="JSON path (default: bench/results/layouts_<N>.json)")
    args = ap.parse_args(argv)

    import torch

    from kvpolicy.eval.evaluate import chat_ids
    from kvpolicy.eval.haystack import haystack_text
    from kvpolicy.exec.pipeline import compile_pipeline
    from kvpolicy.hf import generate as hf
    from kvpolicy.hf.models import load_model, prepare_default_model
    from kvpolicy.lang.registry import load, shipped_names

    lm, tok, shape = load_model(str(prepare_default_model()))
    hay = tok.decode(tok.encode(haystack_text(), add_special_tokens=False)[:args.prompt_len - 40])
    ids = chat_ids(tok, hay + "\n\nWhat is this text about?")[:args.prompt_len]
    N = len(ids)
    cases = [(load(name).with_budget(b), b) for name in shipped_names() if name != "full" for b in args.budgets]
    window, accumulate = hf.capture_needs([p for p, _ in cases], shape, N)
    print(f"prefill of {N} tokens (window {window}, accumulated attention: {accumulate}) ...", flush=True)
    cap = hf.prefill(lm, torch.tensor([ids]), window=window, accumulate=accumulate)
    L, H = shape.num_layers, shape.num_kv_heads
    rows = []
    for policy, budget in cases:
        pipe = compile_pipeline(policy, shape, N)
        counts = torch.stack([pipe.compress(lid, cap.inputs(0, lid)).counts for lid in range(L)]).cpu()
        row = {"policy": policy.name, "budget": budget,
               "rows": math.ceil(int(counts.sum()) / (L * H)),
               "per_layer_classes": math.ceil(float(counts.max(dim=1).values.float().mean())),
               "right_aligned": int(counts.max()),
               "distinct_layer_budgets": len(set(counts.max(dim=1).values.tolist())),
               "heads_differ": bool((counts != counts[:, :1]).any())}
        rows.append(row)
        print(f"{row['policy']:14s} {budget:>5s}  rows {row['rows']:5d}  per-layer classes "
              f"{row['per_layer_classes']:5d}  right-aligned {row['right_aligned']:5d}  (of {N})", flush=True)
    out = args.out or RESULTS / f"layouts_{N}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompt_tokens": N, "layers": L, "kv_heads": H, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
