"""The main job: the embedded default model, one 4k-token needle-in-a-haystack
prompt, the full cache against EMS at 2%: the answers, the KV kept per layer,
and the timings.

Run: .venv/bin/python examples/demo.py   (make demo runs it)
"""

import time

import torch

import kvpolicy as kp
from kvpolicy.eval.evaluate import NeedleSpec, niah_prompt
from kvpolicy.hf.generate import capture_needs, compress, decode, prefill
from kvpolicy.hf.models import load_model

t0 = time.perf_counter()
lm, tok, shape = load_model()
print(f"model {shape.name}: {shape.num_layers} layers, {shape.num_q_heads} query / {shape.num_kv_heads} KV heads "
      f"(loaded in {time.perf_counter() - t0:.1f}s)")
spec = NeedleSpec()
context, question = niah_prompt(tok, spec, 4096, 0.5)
ids = torch.tensor([context + question])
print(f"prompt: {ids.shape[1]} tokens, needle {spec.needle!r} at depth 0.5; question {spec.question!r}\n")

ems = kp.ems(budget="2%")
window, accumulate = capture_needs([ems], shape, ids.shape[1])
t = time.perf_counter()
with torch.no_grad():
    lm(input_ids=ids, use_cache=False)
plain_prefill = time.perf_counter() - t
t = time.perf_counter()
cap = prefill(lm, ids, window=window, accumulate=accumulate)
capture_s = time.perf_counter() - t

for label, policy in (("full", None), ("ems@2%", ems)):
    t = time.perf_counter()
    state = compress(cap, policy, shape)
    compress_s = time.perf_counter() - t
    t = time.perf_counter()
    out = decode(lm, state, cap.last_logits, 24, tok.eos_token_id)
    decode_s = time.perf_counter() - t
    answer = tok.decode(out[0].tolist(), skip_special_tokens=True)
    kept = state.kept[0]
    print(f"[{label}] answer: {answer!r}  ->  {'correct' if spec.answer in answer else 'wrong'}")
    per_layer = [k // shape.num_kv_heads for k in kept]
    print(f"  KV kept per layer (tokens per KV head): {per_layer}")
    print(f"  kept {sum(kept)} of {ids.shape[1] * shape.num_layers * shape.num_kv_heads} token slots "
          f"({100 * sum(kept) / (ids.shape[1] * shape.num_layers * shape.num_kv_heads):.1f}%)")
    print(f"  compression {compress_s:.2f}s, {out.shape[1]} tokens decoded in {decode_s:.2f}s\n")

print(f"prefill: {plain_prefill:.1f}s plain; {capture_s:.1f}s with the capture EMS needs "
      f"(window queries + accumulated attention)")
