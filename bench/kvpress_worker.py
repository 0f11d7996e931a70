"""Run kvpress's presses on prompts given as token ids (the other half of
``bench/kvpress_side_by_side.py``). It runs inside ``.venv-kvpress`` and
imports nothing from kvpolicy: ``python kvpress_worker.py JOB.json OUT.json``.

Per case and mode: one prefill under the press (query-aware: context and
question; context-only: the context, then the question fed uncompressed, as
kvpress's own pipeline does), then greedy decoding with the compressed cache
and the logical positions continuing after the prompt.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import torch


def presses(name: str, ratio: float):
    from kvpress import AdaKVPress, KnormPress, SnapKVPress, StreamingLLMPress

    return {"snapkv": lambda: SnapKVPress(compression_ratio=ratio),
            "streamingllm": lambda: StreamingLLMPress(compression_ratio=ratio),
            "adakv": lambda: AdaKVPress(SnapKVPress(compression_ratio=ratio)),
            "knorm": lambda: KnormPress(compression_ratio=ratio)}[name]()


@torch.no_grad()
def answer(model, tok, press, context: list[int], question: list[int], query_aware: bool, max_new: int) -> str:
    from contextlib import nullcontext

    from transformers import DynamicCache

    cache = DynamicCache()
    first = context + question if query_aware else context
    ids = torch.tensor([first])
    with press(model) if press is not None else nullcontext():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    pos = len(first)
    logits = out.logits[:, -1]
    if not query_aware:
        q = torch.tensor([question])
        out = model(input_ids=q, past_key_values=cache, position_ids=torch.arange(pos, pos + len(question))[None])
        pos += len(question)
        logits = out.logits[:, -1]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    generated = []
    for _ in range(max_new):
        y = int(logits.argmax(-1))
        if y in eos:
            break
        generated.append(y)
        out = model(input_ids=torch.tensor([[y]]), past_key_values=cache, position_ids=torch.tensor([[pos]]))
        pos += 1
        logits = out.logits[:, -1]
    return tok.decode(generated, skip_special_tokens=True)


def main(job_path: str, out_path: str) -> int:
    import kvpress  # noqa: F401 - patches the attention functions AdaKV's masking needs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = json.loads(open(job_path).read())
    tok = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], torch_dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    runs = [("full", None)] + [(f"{p}@{b}", (p, r)) for p in job["presses"] for b, r in job["ratios"].items()]
    records = []
    total = len(job["cases"]) * len(job["modes"])
    for i, case in enumerate(job["cases"]):
        for mode in job["modes"]:
            for label, spec in runs:
                press = presses(*spec) if spec else None
                text = answer(model, tok, press, case["context"], case["question"], mode == "query-aware",
                              job["max_new_tokens"])
                records.append({"policy": label, "mode": mode, "length": case["length"], "depth": case["depth"],
                                "needle": case["needle"], "answer": text, "correct": case["expected"] in text})
            done = i * len(job["modes"]) + job["modes"].index(mode) + 1
            print(f"kvpress: {done}/{total} prompts", file=sys.stderr, flush=True)
    with open(out_path, "w") as f:
        json.dump({"version": version("kvpress"), "transformers": version("transformers"), "cases": records}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
