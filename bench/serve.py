"""How many concurrent long requests fit in a fixed KV pool, with and without
a policy, and how fast they decode: one run, the same requests, side by side.

    python bench/serve.py                       # ems at 10%, 8 x 4k-token requests, 16384-slot pool
    python bench/serve.py --policy snapkv --budget 5% --requests 12

For each configuration (no ``--kv-policy``, then the policy) it starts a real
SGLang server with ``--max-total-tokens`` slots, sends every request at once
(distinct haystack prompts, no shared prefix, greedy, ``--max-tokens`` each)
over the OpenAI streaming API, and measures

* peak concurrency: the most requests decoding at the same moment (from the
  clients' first and last tokens) and the scheduler's own peak
  ``#running-req`` (from its log);
* decode throughput: decoded tokens (all but each request's first) over the
  span from the first request's first token to the last request's last
  (prefills of later requests run inside that span), and the steady rate:
  tokens decoded after the last request's first token, when no prefill runs,
  over that tail;
* wall time for the whole batch.

It prints one table and writes ``bench/results/serve_<model>_<pool>.json``.
On this project's 2-core CPU a 4k-token prefill takes ~25 s, so the default
run takes about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    from kvpolicy.evaluate import chat_ids
    from kvpolicy.haystack import haystack_text

    ids = tokenizer.encode(haystack_text(), add_special_tokens=False)
    out = []
    for i in range(count):
        start = (i * 7919) % max(len(ids) - length, 1)
        text = tokenizer.decode(ids[start:start + length - 40]) + f"\n\nRequest {i}: what is this text about?"
        out.append(chat_ids(tokenizer, text)[:length])
    return out


def stream(server, ids: list[int], max_tokens: int) -> dict:
    """One streamed request: when it was sent and when each token arrived."""
    sent = time.monotonic()
    times = [time.monotonic() for chunk in server.completion_chunks(ids, max_tokens, timeout=3600, ignore_eos=True)
             if chunk["choices"][0].get("text")]
    return {"sent": sent, "tokens": times}


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def run_config(model, label, policy, args, tokenizer_prompts, log_dir) -> dict:
    from kvpolicy.sglang_ext import server as srv

    flags = ["--max-total-tokens", str(args.max_total_tokens), "--max-running-requests", str(args.requests),
             "--chunked-prefill-size", str(args.prompt_len)]
    print(f"[{label}] starting the server ...", flush=True)
    server = srv.start(model, log_dir / f"{label}.log", policy=policy, extra=flags)
    try:
        results = [None] * len(tokenizer_prompts)

        def one(i):
            results[i] = stream(server, tokenizer_prompts[i], args.max_tokens)

        t0 = time.monotonic()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(tokenizer_prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        state = server.kv_state() if policy else {}
        log = server.log()
    finally:
        server.stop()
    spans = [(r["tokens"][0], r["tokens"][-1]) for r in results if r["tokens"]]
    decoded = sum(max(len(r["tokens"]) - 1, 0) for r in results)
    span = max(b for _, b in spans) - min(a for a, _ in spans)
    # steady decoding: after the last request's first token no prefill runs any more
    last_first = max(a for a, _ in spans)
    steady_tokens = sum(sum(1 for t in r["tokens"] if t > last_first) for r in results)
    steady_span = max(b for _, b in spans) - last_first
    running = [int(m) for m in re.findall(r"Decode batch, #running-req: (\d+)", log)]
    return {
        "label": label,
        "policy": Path(policy).name if policy else None,
        "requests": len(results),
        "completed": sum(len(r["tokens"]) == args.max_tokens for r in results),
        "peak_decoding_together": peak_overlap(spans),
        "peak_running_req_scheduler": max(running, default=None),  # from its log, every 40 decode steps
        "decode_tokens": decoded,
        "decode_tokens_per_s": decoded / span if span > 0 else None,
        "steady_decode_tokens": steady_tokens,
        "steady_decode_tokens_per_s": steady_tokens / steady_span if steady_span > 0 else None,
        "time_to_first_token_s": sorted(r["tokens"][0] - r["sent"] for r in results if r["tokens"]),
        "wall_s": wall,
        "kvpolicy_totals": state.get("totals"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="ems", help="shipped policy name or .kvp file (default: ems)")
    ap.add_argument("--budget", default="10%", help="budget for the policy (default: 10%%)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-total-tokens", type=int, default=16384)
    ap.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--out", type=Path, help="JSON path (default: bench/results/serve_<model>_<pool>.json)")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from kvpolicy.models import model_name, resolve_model
    from kvpolicy.registry import load

    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    batch = prompts(tok, args.requests, args.prompt_len)
    policy = load(args.policy).with_budget(args.budget)
    log_dir = RESULTS / "logs"
    policy_file = log_dir / f"{policy.name}_serve.kvp"
    log_dir.mkdir(parents=True, exist_ok=True)
    policy_file.write_text(policy.to_kvp())

    rows = [run_config(model, "no policy", None, args, batch, log_dir),
            run_config(model, f"{policy.name} {args.budget}", str(policy_file), args, batch, log_dir)]
    base, comp = rows
    ratios = {
        "peak_decoding_together": comp["peak_decoding_together"] / max(base["peak_decoding_together"], 1),
        "decode_tokens_per_s": (comp["decode_tokens_per_s"] or 0) / (base["decode_tokens_per_s"] or float("nan")),
        "steady_decode_tokens_per_s": ((comp["steady_decode_tokens_per_s"] or 0)
                                       / (base["steady_decode_tokens_per_s"] or float("nan"))),
        "wall_s": comp["wall_s"] / base["wall_s"],
    }
    print(f"\n{args.requests} requests x {args.prompt_len} tokens, {args.max_tokens} new each, "
          f"pool of {args.max_total_tokens} slots")
    print(f"{'':22s} {'decoding together':>18s} {'decode tok/s':>13s} {'steady tok/s':>13s} {'wall s':>8s}")
    for r in rows:
        print(f"{r['label']:22s} {r['peak_decoding_together']:>18d} {r['decode_tokens_per_s'] or 0:>13.2f} "
              f"{r['steady_decode_tokens_per_s'] or 0:>13.2f} {r['wall_s']:>8.1f}")
    print(f"{'ratio (policy / none)':22s} {ratios['peak_decoding_together']:>18.2f} "
          f"{ratios['decode_tokens_per_s']:>13.2f} {ratios['steady_decode_tokens_per_s']:>13.2f} "
          f"{ratios['wall_s']:>8.2f}")
    out = args.out or RESULTS / f"serve_{model_name(model) or 'model'}_{args.max_total_tokens}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = str(out.relative_to(ROOT.parent)) if out.is_relative_to(ROOT.parent) else out.name
    out.write_text(json.dumps({"args": vars(args) | {"out": shown}, "policy_text": policy.to_kvp(),
                               "rows": rows, "ratios": ratios}, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
