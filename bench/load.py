"""Drive a ``--kv-policy`` server with a bounded number of clients for a
bounded time, then check that nothing leaked.

    python bench/load.py --start --policy ems --clients 8 --duration 120
    python bench/load.py --url http://127.0.0.1:30000 --clients 4 --duration 30

Memory pressure (SGLang must evict the radix tree and retract running
requests; admission reserves at most 32 tokens of each request's output):

    python bench/load.py --start --clients 8 --duration 120 --pressure --ignore-eos --budget-tokens 150 \
        --max-tokens 0 1 16 128 512 \
        --server-flags "--max-total-tokens 1536 --max-running-requests 8 --chunked-prefill-size 512 \
                        --schedule-conservativeness 0.05 --sleep-on-idle"

With ``--start`` the server serves ``--policy`` with a budget of
``--budget-tokens`` tokens (default 400). Each client loops until the time is
up, drawing a prompt shorter than the budget (nothing to compress), around
it, or far above it (haystack text, distinct offsets), a ``max_tokens``
(``--max-tokens``, default 0, 1, 16 or 128), and one of these requests:

* ``stream``: streamed over the OpenAI API (``max_tokens`` 0 goes to
  ``/generate``, which allows it);
* ``hang_up``: streamed, the client disconnects after the second chunk;
* ``cancel``: ``/generate`` with an id, cancelled by ``/abort_request`` in
  the queue, during (chunked) prefill, right after compression or during
  decode (a phase drawn at random and waited for through the server's
  events); where it landed is counted from the events;
* ``parallel``: ``n = 2`` samples of one prompt;
* ``shared``: one long prefix shared by every client, a distinct question,
  every other one with the exact ``full`` policy.

A monitor polls the server every 2 s and records every broken invariant
(:func:`kvpolicy.sglang_ext.server.invariant_problems`); with ``--start`` the
server also runs SGLang's strict allocator checks every step
(``server.STRICT_CHECKS``). Only loopback is ever contacted.

It prints one summary line and writes JSON (``--json``, default
``bench/results/load_<policy>_<clients>x<duration>s.json``): requests sent,
completed, aborted by the client, failed cleanly (an HTTP error), crashed (no
answer: connection refused or reset by a server that went away), per kind,
where cancels landed, p50/p99 latency of completed requests, the server's
totals (compressed, retracted while compressed, captures dropped) and
SGLang's retraction count, and the pool before and after: free slots, slots
the radix tree caches, slots held by requests, and free slots after a cache
flush, which must equal the whole pool. It exits 1 on a leak, a broken
invariant, a crash, or a server that no longer answers "Paris".
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


KINDS = ("stream", "hang_up", "cancel", "parallel", "shared")


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"sent": 0, "completed": 0, "aborted": 0, "failed_cleanly": 0, "crashed": 0}
        self.by_kind = {k: {"sent": 0, "completed": 0, "aborted": 0, "failed_cleanly": 0, "crashed": 0}
                        for k in KINDS}
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.cancelled: list[str] = []  # rids cancelled through /abort_request
        self.retractions = 0  # SGLang's meta_info.num_retractions, summed

    def add(self, kind: str, outcome: str, latency: float | None = None, error: str | None = None):
        with self.lock:
            self.counts[outcome] += 1
            self.by_kind[kind][outcome] += 1
            if latency is not None:
                self.latencies.append(latency)
            if error and len(self.errors) < 20:
                self.errors.append(error)


def one_request(server, kind: str, ids: list[int], max_tokens: int, stats: Stats, timeout: float,
                rng: random.Random, rid: str, custom: dict | None, ignore_eos: bool = False):
    """Send one request of ``kind``; count how it ended."""
    from kvpolicy.sglang_ext.server import ServerError

    stats.add(kind, "sent")
    t0 = time.monotonic()
    extra = {"custom_params": custom} if custom else {}
    if ignore_eos:
        extra["ignore_eos"] = True
    try:
        if kind in ("stream", "hang_up") and max_tokens > 0:
            chunks = 0
            for _ in server.completion_chunks(ids, max_tokens, timeout=timeout, **extra):
                chunks += 1
                if kind == "hang_up" and chunks >= 2:
                    stats.add(kind, "aborted")
                    return
            stats.add(kind, "completed", time.monotonic() - t0)
            return
        if kind == "cancel":
            sender = server.generate_in_background(ids, max(max_tokens, 16), rid, timeout=timeout, **extra)
            cancel_at(server, rid, rng.choice(CANCEL_PHASES), sender)
            try:
                reply = sender.result(timeout)
            except ServerError as exc:
                reply = {"status": 0, "error": str(exc)}
            with stats.lock:
                stats.cancelled.append(rid)
        else:
            params = {"temperature": 0.8, "n": 2} if kind == "parallel" else {}
            reply = server.generate(ids, max_tokens, **params, **extra)
        replies = reply if isinstance(reply, list) else [reply]
        if any("status" in r for r in replies):
            stats.add(kind, "failed_cleanly", error=str(replies)[:300])
            return
        finish = [r["meta_info"]["finish_reason"]["type"] for r in replies]
        with stats.lock:
            stats.retractions += sum(r["meta_info"].get("num_retractions", 0) for r in replies)
        stats.add(kind, "aborted" if "abort" in finish else "completed",
                  None if "abort" in finish else time.monotonic() - t0)
    except urllib.error.HTTPError as exc:
        stats.add(kind, "failed_cleanly", error=f"{exc.code}: {exc.read()[:200]!r}")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        stats.add(kind, "crashed", error=repr(exc))


def retracted_in_log(path: Path) -> int:
    """Requests SGLang retracted, from its log lines ("#retracted_reqs: N")."""
    import re

    return sum(int(n) for n in re.findall(r"#retracted_reqs: (\d+)", path.read_text(errors="replace")))


CANCEL_PHASES = ("queue", "prefill", "compressed", "decode")


#: tokens a request has generated when a ``decode`` cancel is sent
DECODE_TOKENS = 8


def cancel_at(server, rid: str, phase: str, sender, timeout: float = 900) -> None:
    """``/abort_request`` once request ``rid`` reached ``phase``, read from
    the server (never from elapsed time): at once (``queue``), after its
    first prefill chunk was captured (``prefill``), right after compression
    (``compressed``) or :data:`DECODE_TOKENS` tokens into decoding
    (``decode``); never, if it ends first."""
    def ended() -> bool:
        return not sender.alive()

    if phase in ("prefill", "compressed"):
        wanted = "capture" if phase == "prefill" else "compressed"

        def reached(state) -> bool:
            return ended() or any(e["rid"] == rid and e["event"] == wanted for e in state.get("events", []))
        server.wait_until(reached, f"{rid} to reach {phase}", timeout)
    elif phase == "decode":
        server.wait_decoded(rid, DECODE_TOKENS, timeout, unless=ended)
    if sender.alive():
        server.abort(rid)


def where_cancelled(events: list[dict], rids: list[str]) -> dict:
    """Where each cancel landed, from the server's events (its last 1024)."""
    by_rid: dict[str, list[str]] = {}
    for e in events:
        by_rid.setdefault(e["rid"], []).append(e["event"])
    where = {"queued_or_not_compressible": 0, "during_prefill": 0, "after_compression": 0,
             "finished_first": 0}
    for rid in rids:
        seen = by_rid.get(rid, [])
        if not seen:
            where["queued_or_not_compressible"] += 1
        elif "compressed" in seen:
            where["after_compression"] += 1
        elif "capture" in seen and "not_compressed" not in seen:
            where["during_prefill"] += 1
        else:
            where["finished_first"] += 1
    return where


class Monitor(threading.Thread):
    """Polls the server's state; keeps every broken invariant it saw."""

    def __init__(self, server, every: float = 2.0):
        super().__init__(daemon=True)
        self.server, self.every = server, every
        self.stop_event = threading.Event()
        self.problems: list[str] = []
        self.polls = 0
        self.max_running_compressed = 0
        self.min_free_slots: int | None = None

    def run(self):
        from kvpolicy.sglang_ext.server import invariant_problems

        while not self.stop_event.wait(self.every):
            try:
                state = self.server.kv_state()
            except OSError as exc:
                self.problems.append(f"state unavailable: {exc!r}")
                continue
            self.polls += 1
            self.problems += invariant_problems(state)
            self.max_running_compressed = max(self.max_running_compressed, len(state["running"]))
            free = state["available_slots"]
            self.min_free_slots = free if self.min_free_slots is None else min(self.min_free_slots, free)


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
    ap.add_argument("--budget-tokens", type=int, default=400,
                    help="with --start, the served policy is --policy with this budget in tokens; prompts are "
                         "drawn shorter than it (nothing to compress), around it, and far above it")
    ap.add_argument("--pressure", action="store_true",
                    help="with --start: admission reserves at most 32 output tokens per request "
                         "(SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION), so a small pool overcommits and retracts")
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[0, 1, 16, 128],
                    help="each request draws its max_tokens from these")
    ap.add_argument("--ignore-eos", action="store_true",
                    help="every request decodes its whole max_tokens (as SGLang's bench_serving does)")
    ap.add_argument("--timeout", type=float, default=900, help="per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from kvpolicy.eval.evaluate import chat_ids
    from kvpolicy.eval.haystack import haystack_text
    from kvpolicy.hf.models import resolve_model
    from kvpolicy.sglang_ext import server as srv
    from kvpolicy.sglang_ext.server import held_slots

    if args.url and not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        ap.error("--url must be a loopback address")
    model = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(model)
    hay = tok.encode(haystack_text(), add_special_tokens=False)

    if args.start:
        env = dict(srv.STRICT_CHECKS)
        if args.pressure:
            env.update(srv.OVERCOMMIT)
        policy_file = RESULTS / "logs" / "load_policy.kvp"
        policy_file.parent.mkdir(parents=True, exist_ok=True)
        policy_file.write_text(f"policy load\nextends {args.policy}\nbudget {args.budget_tokens} tokens\n")
        server = srv.start(model, RESULTS / "logs" / "load_server.log", policy=str(policy_file),
                           extra=args.server_flags.split(), env=env)
    else:
        server = srv.Server(int(args.url.rsplit(":", 1)[1].split("/")[0]), None, Path("/dev/null"))

    shared_prefix = tok.decode(hay[:args.budget_tokens * 4])
    try:
        server.flush_cache()
        start_state = server.kv_state()
        stats = Stats()
        monitor = Monitor(server)
        monitor.start()
        deadline = time.monotonic() + args.duration
        counter = iter(range(10**9))
        counter_lock = threading.Lock()

        def client(k: int):
            rng = random.Random(args.seed * 1000 + k)
            while time.monotonic() < deadline:
                with counter_lock:
                    n = next(counter)
                kind = rng.choices(KINDS, weights=(4, 1, 2, 1, 2))[0]
                max_tokens = rng.choice([m for m in args.max_tokens if kind != "hang_up" or m >= 16] or [16])
                custom = None
                if kind == "shared":
                    text = shared_prefix + f"\n\nRequest {n}: name one thing the text above mentions."
                    custom = {"kv_policy": "full"} if n % 2 else None
                else:
                    lengths = [args.budget_tokens // 4, args.budget_tokens, args.budget_tokens * 8]
                    length = rng.choice(lengths[1:] if kind == "cancel" else lengths)  # cancels: compressible
                    start = rng.randrange(0, len(hay) - length)
                    text = tok.decode(hay[start:start + length]) + f"\n\nRequest {n}: summarise."
                one_request(server, kind, chat_ids(tok, text), max_tokens, stats, args.timeout, rng,
                            f"load-{n}", custom, args.ignore_eos)

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0

        # wait for the server to finish what clients abandoned, then check the pool
        try:
            end_state = server.wait_idle(timeout=300)
            idle_problems = srv.invariant_problems(end_state, idle=True)
        except srv.ServerError as exc:  # a leak or a stuck request: reported, the run goes on
            end_state, idle_problems = server.kv_state(), [str(exc)[:500]]
        monitor.stop_event.set()
        monitor.join()
        server.flush_cache()
        flushed = server.wait_until(lambda s: srv.held_slots(s) == 0 and s["evictable_slots"] == 0,
                                    "the flushed pool", timeout=300)
        answer = server.generate(chat_ids(tok, "What is the capital of France? One word."), 8)
        alive = "Paris" in answer.get("text", "")
    finally:
        if args.start:
            server.stop()

    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "elapsed_s": elapsed,
        **stats.counts,
        "latency_p50_s": percentile(stats.latencies, 0.50),
        "latency_p99_s": percentile(stats.latencies, 0.99),
        "by_kind": stats.by_kind,
        "cancels": where_cancelled(flushed.get("events", []), stats.cancelled),
        "retractions_in_replies": stats.retractions,  # meta_info.num_retractions of /generate replies
        "retracted_in_server_log": retracted_in_log(server.log_path) if args.start else None,
        "slots": {"free_at_start": start_state["available_slots"], "free_at_end": end_state["available_slots"],
                  "cached_at_end": end_state["evictable_slots"] + end_state["protected_slots"],
                  "held_at_end": held_slots(end_state), "free_after_flush": flushed["available_slots"],
                  "max_total": flushed["max_total_num_tokens"], "min_free_while_running": monitor.min_free_slots},
        "leak_free": held_slots(end_state) == 0 and flushed["available_slots"] == flushed["max_total_num_tokens"],
        "invariant_polls": monitor.polls,
        "invariant_problems": (monitor.problems + idle_problems)[:50],
        "max_compressed_running": monitor.max_running_compressed,
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
          f"| invariants broken {len(result['invariant_problems'])} in {monitor.polls} polls "
          f"| retracted {result['retracted_in_server_log']} (compressed {flushed['totals']['compressed_retracted']}) "
          f"| answers after {alive} | {out}")
    ok = result["leak_free"] and alive and c["crashed"] == 0 and not result["invariant_problems"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
