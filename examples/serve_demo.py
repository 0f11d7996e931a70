"""The main job, as an operator sees it: SGLang serving the embedded default
model with ``--kv-policy``, one long needle-in-a-haystack prompt sent through
the OpenAI client with the full cache and with the policy, the two answers,
the slots each request held in SGLang's pool, how many such requests the pool
holds either way, and the timings. The server is shut down at the end.

Run: .venv/bin/python examples/serve_demo.py [--policy spankv --budget 15%]   (make demo runs it)

The policy and budget: SpanKV at 15% on this 2k-token prompt. SpanKV is the
shipped policy that kept the 7-digit needle best (README § Results,
"Keeping answers: span pooling": 10/10 at 10% on unseen needles, SnapKV
5/10). On this prompt's needle, through the server, 10% answers
"...is 48274." and 15% the right number (`--budget 10%` shows it); CompressKV
and SnapKV lose it here at 10%, 15% and 20%.
"""

import sys
import tempfile
import time
from pathlib import Path

from kvpolicy.eval.evaluate import NeedleSpec, niah_prompt
from kvpolicy.hf.models import prepare_default_model
from kvpolicy.lang.registry import load
from kvpolicy.sglang_ext import server as srv

POLICY, BUDGET, PROMPT_LEN, DEPTH, NEW_TOKENS = "spankv", "15%", 2048, 0.5, 24
POOL = 16384  # --max-total-tokens: the pool both requests share


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default=POLICY, help=f"shipped policy to serve (default: {POLICY})")
    ap.add_argument("--budget", default=BUDGET, help=f"its budget (default: {BUDGET})")
    args = ap.parse_args()
    return run(args.policy, args.budget)


def run(policy_name: str, budget: str) -> int:
    """Serve ``policy_name`` at ``budget`` beside the full cache (the module's defaults in ``make demo``)."""
    POLICY, BUDGET = policy_name, budget
    from openai import OpenAI
    from transformers import AutoTokenizer

    model = prepare_default_model()
    tok = AutoTokenizer.from_pretrained(model)
    spec = NeedleSpec()
    context, question = niah_prompt(tok, spec, PROMPT_LEN, DEPTH)
    ids = context + question
    N = len(ids)
    policy = load(POLICY).with_budget(BUDGET)
    tmp = Path(tempfile.mkdtemp(prefix="kvpolicy-demo-"))
    policy_file = tmp / f"{POLICY}.kvp"
    policy_file.write_text(policy.to_kvp())
    print(f"prompt: {N} tokens, needle {spec.needle!r} at depth {DEPTH}; question {spec.question!r}")
    print(f"starting SGLang on {Path(model).name} with --kv-policy {POLICY} (budget {BUDGET}), "
          f"a {POOL}-slot pool ...", flush=True)
    t = time.perf_counter()
    server = srv.start(model, tmp / "server.log", policy=str(policy_file),
                       extra=["--max-total-tokens", str(POOL), "--sleep-on-idle"])
    print(f"  up in {time.perf_counter() - t:.0f} s; log: {tmp / 'server.log'}\n")
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none")
        rows = []
        for label, custom in (("full cache", {"kv_policy": "full"}), (f"{POLICY} {BUDGET}", None)):
            rid = f"demo-{'full' if custom else POLICY}"
            server.flush_cache()  # each request prefills the whole prompt: no radix hit between them
            t = time.perf_counter()
            reply = client.completions.create(
                model="default", prompt=ids, max_tokens=NEW_TOKENS, temperature=0,
                extra_body={"rid": rid, **({"custom_params": custom} if custom else {})})
            seconds = time.perf_counter() - t
            answer = reply.choices[0].text
            decoded = reply.usage.completion_tokens
            compressed = [e for e in server.events(rid) if e["event"] == "compressed"]
            prompt_slots = compressed[0]["slots_kept"] if compressed else N
            rows.append((label, answer, prompt_slots, decoded, seconds, compressed[0] if compressed else None))
        state = server.kv_state()
    finally:
        server.stop()

    for label, answer, prompt_slots, decoded, seconds, event in rows:
        verdict = "correct" if spec.answer in answer else "wrong"
        held = prompt_slots + decoded
        print(f"[{label}] answer: {answer.strip()!r}  ->  {verdict}")
        print(f"  slots held in the pool: {held} ({prompt_slots} for the {N}-token prompt + {decoded} decoded)")
        print(f"  requests like it the {POOL}-slot pool holds at once: {POOL // held}")
        extra = f", compression {event['seconds']:.2f} s" if event and "seconds" in event else ""
        print(f"  request time {seconds:.1f} s (prefill {N} tokens + {decoded} decoded{extra})\n")
    (_, _, full_slots, full_dec, _, _), (_, _, kept_slots, kept_dec, _, _) = rows
    print(f"{POLICY} {BUDGET}: {(full_slots + full_dec) / (kept_slots + kept_dec):.1f}x fewer slots per request; "
          f"server totals: {state['totals']['requests_compressed']} compressed, "
          f"{state['totals']['slots_freed'] + state['totals']['slots_released_to_tree']} prompt slots given back")
    return 0


if __name__ == "__main__":
    sys.exit(main())
