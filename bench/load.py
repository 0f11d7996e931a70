"""Drive a ``--kv-policy`` server with a bounded number of clients for a
bounded time, then check that nothing leaked.

    python bench/load.py --start --policy ems --clients 8 --duration 120
    python bench/load.py --url http://127.0.0.1:30000 --clients 4 --duration 30

Each client loops until the time is up: a prompt shorter than the budget,
around it, or far above it (haystack text, distinct offsets), a ``max_tokens``
of 1, 16 or 128, streamed over the OpenAI API; one request in ``--abort-every``
hangs up after its second chunk. Only loopback is ever contacted.

It prints one summary line and writes JSON (``--json``, default
``bench/results/load_<policy>_<clients>x<duration>s.json``): requests sent,
completed, aborted by the client, failed cleanly (an HTTP error), crashed (no
answer: connection refused or reset by a server that went away), p50/p99
latency of completed requests, and the pool before and after: free slots,
slots the radix tree caches, slots held by requests, and free slots after a
cache flush, which must equal the free slots at the start.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import urllib.error
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"sent": 0, "completed": 0, "aborted": 0, "failed_cleanly": 0, "crashed": 0}
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def add(self, kind: str, latency: float | None = None, error: str | None = None):
        with self.lock:
            self.counts[kind] += 1
            if latency is not None:
                self.latencies.append(latency)
            if error and len(self.errors) < 20:
                self.errors.append(error)


def one_request(server, ids: list[int], max_tokens: int, hang_up: bool, stats: Stats, timeout: float):
    stats.add("sent")
    t0 = time.monotonic()
    chunks = 0
    try:
        for _ in server.completion_chunks(ids, max_tokens, timeout=timeout):
            chunks += 1
            if hang_up and chunks >= 2:
                break
        stats.add("aborted" if hang_up and chunks >= 2 else "completed",
                  None if hang_up else time.monotonic() - t0)
    except urllib.error.HTTPError as exc:
        stats.add("failed_cleanly", error=f"{exc.code}: {exc.read()[:200]!r}")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        stats.add("crashed", error=repr(exc))


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server on loopback")
    where.add_argument("--start", action="store_true", help="start a server with --policy on the embedded model")
    ap.add_argument("--policy", default="ems", help="with --start: the --kv-policy (default: ems)")
    ap.add_argument("--server-flags", default="--max-total-tokens 16384 --max-running-requests 8",
                    help="with --start: more SGLang flags")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=120, help="seconds of sending (then in-flight requests finish)")
    ap.add_argument("--budget-tokens", type=int, default=400, help="prompt lengths are drawn around this")
    ap.add_argument("--abort-every", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=900, help="per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from kvpolicy.haystack import haystack_text
    from kvpolicy.models import resolve_model
    from kvpolicy.sglang_ext import server as srv
    from kvpolicy.sglang_ext.server import held_slots

    if args.url and not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        ap.error("--url must be a loopback address")
    model = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model)
    hay = tok.encode(haystack_text(), add_special_tokens=False)

    if args.start:
        server = srv.start(model, RESULTS / "logs" / "load_server.log", policy=args.policy,
                           extra=args.server_flags.split())
    else:
        server = srv.Server(int(args.url.rsplit(":", 1)[1].split("/")[0]), None, Path("/dev/null"))
    try:
        server.flush_cache()
        start_state = server.kv_state()
        stats = Stats()
        deadline = time.monotonic() + args.duration
        counter = iter(range(10**9))
        counter_lock = threading.Lock()

        def client(k: int):
            rng = random.Random(args.seed * 1000 + k)
            while time.monotonic() < deadline:
                with counter_lock:
                    n = next(counter)
                length = rng.choice([args.budget_tokens // 4, args.budget_tokens, args.budget_tokens * 8])
                start = rng.randrange(0, len(hay) - length)
                text = tok.decode(hay[start:start + length]) + f"\n\nRequest {n}: summarise."
                ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                         add_generation_prompt=True), add_special_tokens=False)
                one_request(server, ids, rng.choice([1, 16, 128]), n % args.abort_every == args.abort_every - 1,
                            stats, args.timeout)

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0

        # wait for the server to finish what clients abandoned, then check the pool
        end_state = server.wait_idle(timeout=120)
        server.flush_cache()
        time.sleep(1)
        flushed = server.kv_state()
        alive = "text" in server.request("/generate", {"text": "The capital of France is",
                                                        "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
    finally:
        if args.start:
            server.stop()

    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "elapsed_s": elapsed,
        **stats.counts,
        "latency_p50_s": percentile(stats.latencies, 0.50),
        "latency_p99_s": percentile(stats.latencies, 0.99),
        "slots": {"free_at_start": start_state["available_slots"], "free_at_end": end_state["available_slots"],
                  "cached_at_end": end_state["evictable_slots"] + end_state["protected_slots"],
                  "held_at_end": held_slots(end_state), "free_after_flush": flushed["available_slots"],
                  "max_total": flushed["max_total_num_tokens"]},
        "leak_free": held_slots(end_state) == 0 and flushed["available_slots"] == start_state["available_slots"],
        "server_answers_after": alive,
        "kvpolicy_totals": flushed.get("totals"),
        "errors": stats.errors,
    }
    out = args.json or RESULTS / f"load_{args.policy}_{args.clients}x{int(args.duration)}s.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    c = stats.counts
    print(f"sent {c['sent']} completed {c['completed']} aborted {c['aborted']} failed_cleanly {c['failed_cleanly']} "
          f"crashed {c['crashed']} | p50 {result['latency_p50_s'] or 0:.1f}s p99 {result['latency_p99_s'] or 0:.1f}s "
          f"| free slots {result['slots']['free_at_start']} -> {result['slots']['free_after_flush']} after flush "
          f"(held at end {result['slots']['held_at_end']}) | leak-free {result['leak_free']} "
          f"| answers after {alive} | {out}")
    return 0 if result["leak_free"] and alive and c["crashed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
