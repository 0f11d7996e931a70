"""One long generation served three ways, side by side on one server: the
full cache, a policy applied at prefill only, and the same policy also
recompressing during decoding (``trigger prefill, every N tokens``).

    python bench/decode_trigger.py                          # rkv, 256 tokens, every 128, 2048 new tokens
    python bench/decode_trigger.py --policy snapkv --budget 128 --every 64 --max-tokens 1024

The server is launched with the trigger policy; the other two are picked per
request (``custom_params``: ``full``, and the prefill-only copy from an
operator folder), so all three run in the same process, one after the
other, each alone. For each it reports

* slots in use: the most slots neither free nor evictable while it ran
  (sampled from the server's pool counters five times a second: its
  private KV and, uncompressed, its exact prompt locked in the radix tree),
  and the prompt's kept slots;
* throughput: generated tokens over the request's whole time (its ~1 s
  prefill included);
* quality against the full-cache output: how many tokens agree before the
  first difference, the share of positions with the same token (and, for
  the trigger, with the prefill-only output), the share of distinct
  4-grams (a looping generation scores low), and the perplexity of the
  generated continuation under the full-cache model (teacher-forced, the
  transformers path), beside the full-cache output's own;
* the trigger's checks and recompressions (the server's events).

Greedy, ``ignore_eos``. Writes ``bench/results/decode_trigger_<model>_<policy>.json``.
About 6 minutes on this project's 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def prompt_ids(tokenizer, length: int) -> list[int]:
    from kvpolicy.eval.evaluate import chat_ids
    from kvpolicy.eval.haystack import haystack_text

    ids = tokenizer.encode(haystack_text(), add_special_tokens=False)[:length]
    text = tokenizer.decode(ids) + "\n\nRetell the text above in your own words, at length, part by part."
    return chat_ids(tokenizer, text)


def run(server, ids: list[int], max_tokens: int, rid: str, policy: str) -> dict:
    """One generation and the most slots in use meanwhile."""
    server.flush_cache()
    server.wait_idle()
    peak, done = [0], threading.Event()

    def watch():  # samples the pool five times a second until the request ends (a measurement, not a phase)
        while True:
            peak[0] = max(peak[0], in_use(server.kv_state()))
            if done.wait(0.2):
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    sent = time.monotonic()
    params = {"custom_params": {"kv_policy": policy}} if policy else {}  # None: the launch policy
    reply = server.generate(ids, max_tokens, rid=rid, ignore_eos=True, timeout=3600, **params)
    end = time.monotonic()
    done.set()
    watcher.join()
    out = reply["output_ids"]
    events = server.events(rid)
    compressed = [e for e in events if e["event"] == "compressed"]
    checks = [e for e in events if e["event"] == "recompressed"]
    seconds = end - sent
    return {"policy": policy or "with_trigger", "output_ids": out, "tokens": len(out), "peak_slots_in_use": peak[0],
            "prompt_slots_kept": compressed[0]["slots_kept"] if compressed else len(ids),
            "recompressions": len(checks), "most_slots_at_a_check": max((e["held"] for e in checks), default=None),
            "compression_seconds": sum(e.get("seconds", 0.0) for e in compressed + checks),
            "seconds": seconds, "tokens_per_s": len(out) / seconds if seconds > 0 else None}


def in_use(state: dict) -> int:
    """Slots neither free nor evictable: what running requests hold, their
    exact prompt in the radix tree (locked) included."""
    return state["max_total_num_tokens"] - state["available_slots"] - state["evictable_slots"]


def continuation_ppl(model_dir: str, ids: list[int], out: list[int]) -> float:
    """Perplexity of ``out`` after ``ids`` under the full-cache model."""
    import torch

    from kvpolicy.hf.models import load_model

    lm, _, _ = load_model(model_dir)
    seq = torch.tensor([ids + out])
    with torch.no_grad():
        logits = lm(input_ids=seq).logits[0, len(ids) - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(out), reduction="mean")
    return math.exp(float(nll))


def distinct_ngrams(tokens: list[int], n: int = 4) -> float:
    """Distinct ``n``-grams over all of them: 1.0 never repeats, near 0 loops."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def same_positions(a: list[int], b: list[int]) -> float:
    """Share of positions where the two outputs hold the same token."""
    return sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens equal before the first difference."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="rkv", help="a shipped policy name or .kvp file (default: rkv)")
    ap.add_argument("--budget", default="256", help="its budget (default: 256 tokens)")
    ap.add_argument("--every", type=int, default=128, help="decoded tokens between checks (default: 128)")
    ap.add_argument("--prompt-len", type=int, default=512, help="haystack tokens in the prompt (default: 512)")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from kvpolicy.hf.models import model_name, resolve_model
    from kvpolicy.lang.registry import load
    from kvpolicy.sglang_ext import server as srv

    model = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model)
    ids = prompt_ids(tok, args.prompt_len)
    base = load(args.policy).with_budget(args.budget)
    trigger = base.with_trigger(prefill=True, decode_every=args.every).with_name("with_trigger", base.description)
    prefill_only = base.with_trigger(prefill=True, decode_every=None).with_name("prefill_only", base.description)
    work = RESULTS / "logs" / "decode_trigger"
    folder = work / "policies"
    folder.mkdir(parents=True, exist_ok=True)
    (work / "with_trigger.kvp").write_text(trigger.to_kvp())
    (folder / "prefill_only.kvp").write_text(prefill_only.to_kvp())
    pool = len(ids) + args.max_tokens + 1024
    print(f"[decode_trigger] starting the server ({pool} slots) ...", flush=True)
    server = srv.start(model, work / "server.log", policy=str(work / "with_trigger.kvp"),
                       extra=["--max-total-tokens", str(pool), "--kv-policy-dir", str(folder)])
    rows = []
    try:
        for label, name in (("full cache", "full"), ("prefill only", "prefill_only"), ("with trigger", None)):
            print(f"[decode_trigger] {label}: {args.max_tokens} tokens ...", flush=True)
            rows.append({"label": label, **run(server, ids, args.max_tokens, f"dt-{name or 'trigger'}", name)})
    finally:
        server.stop()
    full, prefill_only = rows[0]["output_ids"], rows[1]["output_ids"]
    for r in rows:
        r["agree_before_first_difference"] = agreement(r["output_ids"], full)
        r["same_tokens_as_full"] = same_positions(r["output_ids"], full)
        r["same_tokens_as_prefill_only"] = same_positions(r["output_ids"], prefill_only)
        r["distinct_4grams"] = distinct_ngrams(r["output_ids"])
        r["continuation_ppl_under_full_model"] = continuation_ppl(model, ids, r["output_ids"])

    print(f"\n{args.policy} at {args.budget}, every {args.every} tokens; prompt {len(ids)} tokens, "
          f"{args.max_tokens} new (greedy, ignore_eos)")
    head = ["peak slots", "prompt kept", "tok/s", "agree", "same as full", "distinct 4g", "ppl (full)",
            "recompressions"]
    print(f"{'':16s}" + "".join(f"{h:>16s}" for h in head))
    for r in rows:
        cells = [r["peak_slots_in_use"], r["prompt_slots_kept"], r["tokens_per_s"], r["agree_before_first_difference"],
                 r["same_tokens_as_full"], r["distinct_4grams"], r["continuation_ppl_under_full_model"],
                 r["recompressions"]]
        print(f"{r['label']:16s}" + "".join(f"{c:>16.2f}" if isinstance(c, float) else f"{c:>16d}" for c in cells))
    ratios = {r["label"]: {"peak_slots_in_use": r["peak_slots_in_use"] / rows[0]["peak_slots_in_use"],
                           "tokens_per_s": r["tokens_per_s"] / rows[0]["tokens_per_s"]} for r in rows[1:]}
    for label, ratio in ratios.items():
        print(f"ratio {label:10s}: peak slots {ratio['peak_slots_in_use']:.3f}x, decode {ratio['tokens_per_s']:.2f}x "
              "of the full cache")
    out = args.out or RESULTS / f"decode_trigger_{model_name(model) or 'model'}_{base.name}.json"
    shown = str(out.relative_to(ROOT.parent)) if out.is_relative_to(ROOT.parent) else out.name
    out.write_text(json.dumps({"args": vars(args) | {"out": shown}, "prompt_tokens": len(ids),
                               "policy_text": trigger.to_kvp(), "rows": [{k: v for k, v in r.items()
                                                                         if k != "output_ids"} for r in rows],
                               "ratios": ratios}, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
