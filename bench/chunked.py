"""Chunked prefill with small chunks gives the same compression as one chunk.

    python bench/chunked.py    # 4096-token prompts, 3 depths, ems/snapkv/h2o: chunks of 256 vs one
    python bench/chunked.py --prompt-len 4096 --prompts 2 --policies ems snapkv    # the committed run

Starts two ``--kv-policy`` servers on the embedded model that differ only in
``--chunked-prefill-size`` (256, and one larger than the prompt), sends the
same needle prompts (depths spread over the context) to both with each
policy (``custom_params``), with the radix cache flushed before each, and
compares the greedy answers token for token and the slots kept. Capture
across chunks (the last ``W`` queries, and each chunk's share of
``global()``'s accumulated attention) is what differs between the two.
Prints one line per prompt and writes JSON
(``bench/results/chunked_<prompt_len>.json``); exits 1 if any answer or
budget differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=3, help="needle depths, spread over (0, 1)")
    ap.add_argument("--policies", nargs="+", default=["ems", "snapkv", "h2o"])
    ap.add_argument("--budget", default="10%")
    ap.add_argument("--small-chunk", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from kvpolicy.eval.evaluate import NeedleSpec, niah_prompt
    from kvpolicy.hf.models import resolve_model
    from kvpolicy.sglang_ext import server as srv

    model = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model)
    needle = NeedleSpec("Mary's favourite city is Lisbon.", "What is Mary's favourite city?", "Lisbon")
    pool = str(2 * args.prompt_len + 1024)
    one_chunk = str(args.prompt_len + 512)
    flags = ["--max-total-tokens", pool, "--max-running-requests", "2", "--sleep-on-idle"]
    servers: dict[str, srv.Server] = {}

    def start(name: str, chunk: str):
        servers[name] = srv.start(model, RESULTS / "logs" / f"chunked_{name}.log", policy="ems",
                                  extra=flags + ["--chunked-prefill-size", chunk], env=srv.STRICT_CHECKS)

    threads = [threading.Thread(target=start, args=("small", str(args.small_chunk))),
               threading.Thread(target=start, args=("one", one_chunk))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = []
    try:
        if len(servers) != 2:
            raise SystemExit("a server did not start; see bench/results/logs/chunked_*.log")
        print(f"servers up in {time.monotonic() - t0:.0f} s", flush=True)
        for p in range(args.prompts):
            depth = (p + 1) / (args.prompts + 1)
            context, question = niah_prompt(tok, needle, args.prompt_len, depth)
            ids = context + question
            for policy in args.policies:
                custom = {"kv_policy": policy, "kv_budget": args.budget}
                out = {}
                for name, server in servers.items():
                    rid = f"chunked-{name}-{p}-{policy}"
                    server.flush_cache()  # a whole prefill each time, never a radix hit on the last one
                    server.wait_idle()
                    t = time.monotonic()
                    reply = server.generate(ids, args.max_new_tokens, rid=rid, custom_params=custom)
                    kept = [e["slots_kept"] for e in server.events(rid) if e["event"] == "compressed"]
                    out[name] = {"output_ids": reply.get("output_ids"), "text": reply.get("text"),
                                 "kept": kept, "seconds": time.monotonic() - t}
                same = out["small"]["output_ids"] == out["one"]["output_ids"] is not None
                same_kept = out["small"]["kept"] == out["one"]["kept"] != []
                rows.append({"prompt_tokens": len(ids), "depth": depth, "policy": policy,
                             "same_answer": same, "same_budget": same_kept, **out})
                print(f"{len(ids)} tokens depth {depth:.2f} {policy:>8}: same answer {same}, kept "
                      f"{out['small']['kept']} vs {out['one']['kept']}, "
                      f"{(out['small']['text'] or '')[:40]!r} | "
                      f"{out['small']['seconds']:.0f} s vs {out['one']['seconds']:.0f} s", flush=True)
        problems = {name: srv.invariant_problems(s.wait_idle(), idle=True) for name, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()

    result = {"args": {k: str(v) for k, v in vars(args).items()}, "chunk_sizes": [args.small_chunk, int(one_chunk)],
              "all_same": all(r["same_answer"] and r["same_budget"] for r in rows),
              "invariant_problems": problems, "rows": rows}
    out_path = args.json or RESULTS / f"chunked_{args.prompt_len}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    n_same = sum(r["same_answer"] and r["same_budget"] for r in rows)
    print(f"{n_same}/{len(rows)} identical (answer and budget), chunks of {args.small_chunk} vs one chunk "
          f"| invariant problems {sum(map(len, problems.values()))} | {out_path}")
    return 0 if result["all_same"] and not any(problems.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
