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
* ``prefill_cpu_s``: the CPU seconds the server's processes spent on that
  request (user + system, read from ``/proc`` before and after it): time
  taken from the server by another process shows as wall time without CPU
  time (measured on this machine: the two move together, so the spread of
  the prefills is the server's own work);
* ``compression_s``: the server's own time for the compression of the same
  prompt in a request for two tokens (the ``compressed`` event's
  ``seconds``);
* ``one_pass_layers``: the layers whose ``global()`` came from the one
  attention pass (the same event's; 0 for a policy without ``global()``);
* ratios over ``full``: the prefill alone (wall and CPU), and prefill +
  compression, each
  the median of the rounds' ratios over the same round's ``full`` prefill
  (requests seconds apart share the shared machine's drift).

Writes ``bench/results/serve_prefill_<model>_<length>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def server_cpu_seconds(server) -> float:
    """User + system CPU seconds of every process in the server's process
    group (it starts in its own session): the scheduler, the tokenizer, the
    detokenizer. Linux ``/proc``; ``stat`` fields after the command name."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == server.process.pid:  # fields: state ppid pgrp ... utime stime
            total += int(fields[11]) + int(fields[12])
    return total / tick


def per_round(times: list[float], full: list[float]) -> list[float]:
    """Each round's time over the same round's ``full`` prefill: requests a
    few seconds apart share the machine's drift (their median is reported)."""
    return [x / f for x, f in zip(times, full)]


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
    prefill_cpu = {n: [] for n in names}
    compression = {n: [] for n in names}
    one_pass = {n: [] for n in names}  # layers whose global() came from the one attention pass
    print(f"starting the server ({len(ids)}-token prompt) ...", flush=True)
    server = srv.start(model, log_dir / "serve_prefill.log", policy=str(launch), extra=flags)
    try:
        for rep in range(args.repeats + 1):  # the first round warms up, not counted
            for name in names:
                custom = {"kv_policy": name} if name == "full" else {"kv_policy": name, "kv_budget": args.budget}
                server.flush_cache()
                t, cpu = time.perf_counter(), server_cpu_seconds(server)
                reply = server.generate(ids, 1, custom_params=custom)
                took, cpu_took = time.perf_counter() - t, server_cpu_seconds(server) - cpu
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
                    prefill_cpu[name].append(cpu_took)
                    compression[name].append(seconds)
                    one_pass[name].append(layers)
                print(f"  round {rep} {name:8s} prefill {took:6.2f}s ({cpu_took:6.2f} CPU s)  compression {seconds:5.2f}s  "
                      f"one-pass layers {layers:3d}" + ("" if rep else "  (warm-up)"), flush=True)
    finally:
        server.stop()
    rows = []
    for name in names:
        p, c = statistics.median(prefill[name]), statistics.median(compression[name])
        paired = per_round(prefill[name], prefill["full"])
        paired_cpu = per_round(prefill_cpu[name], prefill_cpu["full"])
        with_c = per_round([x + y for x, y in zip(prefill[name], compression[name])], prefill["full"])
        rows.append({"policy": name, "prefill_s": p, "compression_s": c,
                     "prefill_ratio": statistics.median(paired),
                     "with_compression_ratio": statistics.median(with_c),
                     "prefill_cpu_s": statistics.median(prefill_cpu[name]),
                     "prefill_cpu_ratio": statistics.median(paired_cpu),
                     "prefill_ratio_all": paired, "prefill_cpu_ratio_all": paired_cpu, "prefill_all_s": prefill[name],
                     "compression_all_s": compression[name],
                     "one_pass_layers": one_pass[name]})
    print(f"\n{len(ids)}-token prompt, budget {args.budget}, median of {args.repeats}")
    print(f"{'policy':10s}{'prefill s':>12s}{'CPU s':>9s}{'compress s':>12s}{'prefill x':>12s}{'CPU x':>9s}"
          f"{'+compress x':>13s}")
    for r in rows:
        print(f"{r['policy']:10s}{r['prefill_s']:>12.2f}{r['prefill_cpu_s']:>9.2f}{r['compression_s']:>12.2f}"
              f"{r['prefill_ratio']:>12.3f}{r['prefill_cpu_ratio']:>9.3f}{r['with_compression_ratio']:>13.3f}")
    out = RESULTS / f"serve_prefill_{(model_name(model) or 'model').lower()}_{args.length}.json"
    out.write_text(json.dumps({"model": model_name(model), "length": len(ids), "budget": args.budget,
                               "repeats": args.repeats, "device": "cpu", "machine": platform.machine(),
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
