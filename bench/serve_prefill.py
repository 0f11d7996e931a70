"""What a policy adds to a served prefill: capture and compression, beside
the plain prefill of the same prompt on the same server, in one run.

    python bench/serve_prefill.py                         # 4k tokens: full, ems, h2o, snapkv at 10%
    python bench/serve_prefill.py --length 2048 --repeats 5 --policy ems

One real SGLang server with ``--kv-policy`` (``--chunked-prefill-size`` =
the prompt, so one chunk). Each request picks its policy through
``custom_params``; ``full`` keeps every token, so its prefill is SGLang's
own, with no capture: the baseline. Before each request the radix cache is
flushed, so every prefill computes the whole prompt. Interleaved over the
policies, ``--repeats`` times, medians taken:

* ``prefill_s``: wall time of a request for one token (the prefill and its
  capture; a request that ends at its prefill is never compressed);
* ``compression_s``: the server's own time for the compression of the same
  prompt in a request for two tokens (the ``compressed`` event's
  ``seconds``);
* ``one_pass_layers``: the layers whose ``global()`` came from the one
  attention pass (the same event's; 0 for a policy without ``global()``);
* ratios over ``full``: the prefill alone, and prefill + compression.

Writes ``bench/results/serve_prefill_<model>_<length>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", nargs="+", default=["ems", "h2o", "snapkv"])
    ap.add_argument("--budget", default="10%")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from kvpolicy.hf.models import model_name, resolve_model
    from kvpolicy.sglang_ext import server as srv

    sys.path.insert(0, str(ROOT))
    from serve import prompts

    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    (ids,) = prompts(tok, 1, args.length)
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    launch = log_dir / "serve_prefill.kvp"
    launch.write_text(f"policy serve_prefill\nextends {args.policy[0]}\nbudget {args.budget}\n")
    flags = ["--max-total-tokens", str(4 * args.length), "--max-running-requests", "2",
             "--chunked-prefill-size", str(args.length)]
    names = ["full", *args.policy]
    prefill = {n: [] for n in names}
    compression = {n: [] for n in names}
    one_pass = {n: [] for n in names}  # layers whose global() came from the one attention pass
    print(f"starting the server ({len(ids)}-token prompt) ...", flush=True)
    server = srv.start(model, log_dir / "serve_prefill.log", policy=str(launch), extra=flags)
    try:
        for rep in range(args.repeats + 1):  # the first round warms up, not counted
            for name in names:
                custom = {"kv_policy": name} if name == "full" else {"kv_policy": name, "kv_budget": args.budget}
                server.flush_cache()
                t = time.perf_counter()
                reply = server.generate(ids, 1, custom_params=custom)
                took = time.perf_counter() - t
                if "text" not in reply:
                    raise SystemExit(f"{name}: {reply}")
                server.flush_cache()
                rid = f"prefill-{name}-{rep}"
                server.generate(ids, 2, rid=rid, custom_params=custom)
                events = [e for e in server.events(rid) if e["event"] == "compressed"]
                seconds = events[0]["seconds"] if events else 0.0
                layers = events[0].get("one_pass_layers", 0) if events else 0
                if rep:
                    prefill[name].append(took)
                    compression[name].append(seconds)
                    one_pass[name].append(layers)
                print(f"  round {rep} {name:8s} prefill {took:6.2f}s  compression {seconds:5.2f}s  "
                      f"one-pass layers {layers:3d}" + ("" if rep else "  (warm-up)"), flush=True)
    finally:
        server.stop()
    base = statistics.median(prefill["full"])
    rows = []
    for name in names:
        p, c = statistics.median(prefill[name]), statistics.median(compression[name])
        rows.append({"policy": name, "prefill_s": p, "compression_s": c, "prefill_ratio": p / base,
                     "with_compression_ratio": (p + c) / base, "prefill_all_s": prefill[name],
                     "compression_all_s": compression[name],
                     "one_pass_layers": one_pass[name]})
    print(f"\n{len(ids)}-token prompt, budget {args.budget}, median of {args.repeats}")
    print(f"{'policy':10s}{'prefill s':>12s}{'compress s':>12s}{'prefill x':>12s}{'+compress x':>13s}")
    for r in rows:
        print(f"{r['policy']:10s}{r['prefill_s']:>12.2f}{r['compression_s']:>12.2f}{r['prefill_ratio']:>12.3f}"
              f"{r['with_compression_ratio']:>13.3f}")
    out = RESULTS / f"serve_prefill_{(model_name(model) or 'model').lower()}_{args.length}.json"
    out.write_text(json.dumps({"model": model_name(model), "length": len(ids), "budget": args.budget,
                               "repeats": args.repeats, "device": "cpu", "machine": platform.machine(),
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
