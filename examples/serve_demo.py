"""The main job, as an operator sees it: SGLang serving the embedded default
model with ``--kv-policy``, one long needle-in-a-haystack prompt sent through
the OpenAI client with the full cache and with the policy, the two answers,
the slots each request held in SGLang's pool, how many such requests the pool
holds either way, and the timings. The server is shut down at the end.

Run: .venv/bin/python examples/serve_demo.py   (make demo runs it)

The policy and budget: SpanKV at 10% on a 2k-token prompt, the smallest
budget at which a shipped policy found the 7-digit needle in every case
measured on unseen needles (README § Results, "Keeping answers: span
pooling": 10/10 at 10%, 4/10 at 5%; SnapKV 5/10 at 10%).
"""

import sys
import tempfile
import time
from pathlib import Path

from kvpolicy.evaluate import NeedleSpec, niah_prompt
from kvpolicy.models import prepare_default_model
from kvpolicy.registry import load
from kvpolicy.sglang_ext import server as srv

POLICY, BUDGET, PROMPT_LEN, DEPTH, NEW_TOKENS = "spankv", "10%", 2048, 0.5, 24
POOL = 16384  # --max-total-tokens: the pool both requests share


def main() -> int:
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
