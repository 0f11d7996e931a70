"""How many concurrent long requests fit in a fixed KV pool, with and without
a policy, and how fast they decode: one run, the same requests, side by side.

    python bench/serve.py                       # ems at 10%, 8 x 4k-token requests, 16384-slot pool
    python bench/serve.py --policy snapkv --budget 5% --requests 12
    python bench/serve.py --policy ems compresskv adakv   # several policies, each beside no policy
    python bench/serve.py --requests 24 --budget 2% 10%   # capacity: more requests than fit without a policy

For each configuration (no ``--kv-policy``, then each policy) it starts a real
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
* slots per request: what each compressed request's prompt holds in the
  pool (from the server's counters; per-layer and per-head budgets pack into
  ``ceil(rows / (layers * KV heads))`` slots);
* time to first token (median) and total throughput, (prompt + generated
  tokens) / wall;
* wall time for the whole batch;
* compression time per request (the server's own, from ``/server_info``).

It prints one table and writes ``bench/results/serve_<model>_<pool>.json``.
On this project's 2-core CPU a 4k-token prefill takes ~25 s, so the default
run takes about 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    from kvpolicy.eval.evaluate import chat_ids
    from kvpolicy.eval.haystack import haystack_text

    ids = tokenizer.encode(haystack_text(), add_special_tokens=False)
    out = []
    for i in range(count):
        start = (i * 7919) % max(len(ids) - length, 1)
        text = tokenizer.decode(ids[start:start + length - 40]) + f"\n\nRequest {i}: what is this text about?"
        out.append(chat_ids(tokenizer, text)[:length])
    return out


def stream(server, ids: list[int], max_tokens: int) -> dict:
    """One streamed request: when it was sent and when each token arrived.
    Tokens are counted from each chunk's running usage
    (``continuous_usage_stats``), not from chunks with text: a chunk may carry
    no text (a token held back mid-character) or several tokens."""
    sent = time.monotonic()
    times: list[float] = []
    options = {"include_usage": True, "continuous_usage_stats": True}
    for chunk in server.completion_chunks(ids, max_tokens, timeout=3600, ignore_eos=True, stream_options=options):
        count = (chunk.get("usage") or {}).get("completion_tokens")
        if count is not None and count > len(times):
            times.extend([time.monotonic()] * (count - len(times)))
    return {"sent": sent, "tokens": times}


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def slots_per_request(totals: dict | None) -> float | None:
    """Prompt slots a compressed request held, on average (``None``: no policy)."""
    if not totals or not totals.get("requests_compressed"):
        return None
    return totals["slots_kept"] / totals["requests_compressed"]


def compression_per_request(totals: dict | None) -> float | None:
    """The server's own compression time per compressed request (``None``: no policy)."""
    if not totals or not totals.get("requests_compressed") or "compression_seconds" not in totals:
        return None
    return totals["compression_seconds"] / totals["requests_compressed"]


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
        "median_time_to_first_token_s": statistics.median_high([r["tokens"][0] - r["sent"] for r in results
                                                                if r["tokens"]]),
        "total_tokens_per_s": (sum(map(len, tokenizer_prompts)) + decoded + len(spans)) / wall,
        "slots_per_request": slots_per_request(state.get("totals")),
        "compression_s_per_request": compression_per_request(state.get("totals")),
        "wall_s": wall,
        "kvpolicy_totals": state.get("totals"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", nargs="+", default=["ems"],
                    help="shipped policy names or .kvp files, each run beside no policy (default: ems)")
    ap.add_argument("--budget", nargs="+", default=["10%"], help="budgets, each policy at each (default: 10%%)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-total-tokens", type=int, default=16384)
    ap.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--out", type=Path, help="JSON path (default: bench/results/serve_<model>_<pool>_<policies>.json)")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from kvpolicy.hf.models import model_name, resolve_model
    from kvpolicy.lang.registry import load

    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    batch = prompts(tok, args.requests, args.prompt_len)
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    policies = [(load(name).with_budget(budget), budget) for name in args.policy for budget in args.budget]

    base = run_config(model, "no policy", None, args, batch, log_dir)
    rows, ratios = [base], {}
    for policy, budget in policies:
        policy_file = log_dir / f"{policy.name}_{budget.rstrip('%')}_serve.kvp"
        policy_file.write_text(policy.to_kvp())
        comp = run_config(model, f"{policy.name} {budget}", str(policy_file), args, batch, log_dir)
        rows.append(comp)
        ratios[comp["label"]] = {key: _ratio(comp[key], base[key]) for key in RATIO_KEYS}
    print(f"\n{args.requests} requests x {args.prompt_len} tokens, {args.max_tokens} new each, "
          f"pool of {args.max_total_tokens} slots")
    head = ["decoding together", "slots/request", "decode tok/s", "steady tok/s", "TTFT s", "total tok/s", "wall s"]
    print(f"{'':24s}" + "".join(f"{h:>18s}" for h in head))
    for r in rows:
        cells = [r["peak_decoding_together"], r["slots_per_request"] or args.prompt_len, r["decode_tokens_per_s"],
                 r["steady_decode_tokens_per_s"], r["median_time_to_first_token_s"], r["total_tokens_per_s"],
                 r["wall_s"]]
        print(f"{r['label']:24s}" + "".join(f"{c or 0:>18.2f}" for c in cells))
    for label, ratio in ratios.items():
        print(f"{'ratio ' + label:24s}{ratio['peak_decoding_together']:>18.2f}{'':>18s}"
              + "".join(f"{ratio[k]:>18.2f}" for k in RATIO_KEYS[1:]))
    names = "_".join(dict.fromkeys(p.name for p, _ in policies))
    if len(args.budget) > 1 or args.budget != ["10%"]:
        names += "_" + "_".join(b.rstrip("%") for b in args.budget)
    out = args.out or RESULTS / f"serve_{model_name(model) or 'model'}_{args.max_total_tokens}_{names}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = str(out.relative_to(ROOT.parent)) if out.is_relative_to(ROOT.parent) else out.name
    out.write_text(json.dumps({"args": vars(args) | {"out": shown},
                               "policy_texts": {f"{p.name} {b}": p.to_kvp() for p, b in policies},
                               "rows": rows, "ratios": ratios}, indent=2, default=str))
    print(f"wrote {out}")
    return 0


RATIO_KEYS = ["peak_decoding_together", "decode_tokens_per_s", "steady_decode_tokens_per_s",
              "median_time_to_first_token_s", "total_tokens_per_s", "wall_s"]


def _ratio(a, b) -> float:
    return (a or 0) / b if b else float("nan")


if __name__ == "__main__":
    sys.exit(main())
