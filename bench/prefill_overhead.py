"""Prefill time with compression over the time without, side by side in one run.

For each policy: the plain prefill (the model's own SDPA attention, no
capture), and the prefill with our capture (window queries; the accumulated
attention, where the policy needs it, from the pipeline's one attention pass,
compiled on the CPU when it builds) plus the compression of every layer.
Repeated and interleaved so machine noise hits both sides alike; the ratio
is the median of each round's ratio over the same round's plain prefill
(pairs, not a ratio of medians: the plain prefill alone moved by 20% between
rounds on a shared 2-core machine), after one warm-up forward. Writes
bench/results/prefill_overhead_<model>_<len>.json.

Run: .venv/bin/python bench/prefill_overhead.py [--length 2048] [--repeats 3] [--policy full snapkv ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from kvpolicy.eval.evaluate import entries
from kvpolicy.eval.haystack import haystack_text
from kvpolicy.hf.generate import capture_needs, compress, prefill
from kvpolicy.hf.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policy", nargs="+", default=["streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "ems",
                                                    "compresskv"])
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--model")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    lm, tok, shape = load_model(args.model)
    ids = torch.tensor([tok.encode(haystack_text(), add_special_tokens=False)[:args.length]])
    with torch.no_grad():
        lm(input_ids=ids, use_cache=False)  # warm-up: the first forward pays for allocation
    rows = []
    for e in entries(args.policy, [args.budget]):
        plain, ours, comp = [], [], []
        window, acc = capture_needs([e.policy], shape, args.length)
        for _ in range(args.repeats):
            t = time.perf_counter()
            with torch.no_grad():
                lm(input_ids=ids, use_cache=False)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            cap = prefill(lm, ids, window=window, accumulate=acc)
            t_cap = time.perf_counter()
            compress(cap, e.policy, shape)
            end = time.perf_counter()
            ours.append(end - t)
            comp.append(end - t_cap)
        row = {"policy": e.label, "prefill_s": statistics.median(plain), "with_compression_s": statistics.median(ours),
               "compress_only_s": statistics.median(comp), "accumulated_attention": acc, "window": window}
        row["ratio_all"] = [o / p for o, p in zip(ours, plain)]
        row["ratio"] = statistics.median(row["ratio_all"])
        rows.append(row)
        print(f"{e.label:<18} prefill {row['prefill_s']:.2f}s  with capture+compression {row['with_compression_s']:.2f}s"
              f"  (compression alone {row['compress_only_s']:.2f}s)  ratio {row['ratio']:.3f}")
    out = Path(__file__).parent / "results" / f"prefill_overhead_{(shape.name or 'model').lower()}_{args.length}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": shape.name, "length": args.length, "repeats": args.repeats,
                               "budget": args.budget, "device": "cpu", "threads": torch.get_num_threads(),
                               "machine": platform.machine(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
