"""CompressKV's two offline calibration steps (arXiv 2508.02401), on any local
HF model, writing the artifacts that policies reference (schemas in
:mod:`kvpolicy.lang.artifacts`).

**Semantic retrieval heads** (§3.1). Needle-in-a-haystack probes over offline
text; greedy decoding; at each step ``s`` that emits a token ``y_s`` occurring
``c_s`` times in the needle span ``N``, every query head ``(l, h)`` adds
``c_s * sum_{j in N} A_s[l, h, j]``, its attention mass on the whole needle
from the query of that step. A trial counts if the answer's ROUGE-1 recall
exceeds ``min_recall`` (0.5). A head's score is the mean over counted trials;
heads are ranked within each layer. Our choices: the probes are 3 needles x
lengths x depths over ``pydoc_data.topics`` (the paper: 20 lengths x 10
depths over books); recall is measured against the needle's *answer* span
(our needles are sentences whose question asks for part of them, so recall of
the whole sentence would reject correct short answers).

**Layer budgets from eviction error** (§3.3). Every layer at budget 32 with
the policy's own selection; at each decode step each layer's attention output
is computed with the full KV and with the compressed "shadow" KV (kept tokens
plus everything decoded since), both through ``o_proj``, and the relative
error ``||o_c - o|| / (||o|| + 1e-5)`` is summed per layer. Per dataset the
sums become shares; shares are averaged over datasets and normalised. The
model itself decodes from the full cache, so every step compares like with
like. Our datasets are offline stand-ins for LongBench: needle QA, key-value
lookup and free continuation of reference prose.
"""

from __future__ import annotations

import random
from dataclasses import replace

import torch

from kvpolicy.eval.haystack import NEEDLES, build_probe, haystack_text, rouge1_recall
from kvpolicy.exec.pipeline import compile_pipeline
from kvpolicy.exec.reference.attention import window_attention
from kvpolicy.exec.reference.scores import LayerInputs
from kvpolicy.hf.generate import base_attention, tap_attention
from kvpolicy.lang import ir
from kvpolicy.lang.artifacts import VERSION, check_artifact
from kvpolicy.lang.budgets import ModelShape


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc)


@torch.no_grad()
def _greedy(lm, ids: list[int], max_new_tokens: int, eos: int | None, on_step=None) -> list[int]:
    """Prefill all but the last prompt token, then feed tokens one by one
    (so every emitted token has a single-query step whose attention we see)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    prompt = torch.tensor([ids])
    if len(ids) > 1:
        lm(input_ids=prompt[:, :-1], past_key_values=cache, use_cache=True)
    token = prompt[:, -1:]
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = lm(input_ids=token, past_key_values=cache, use_cache=True).logits[0, -1]
        y = int(logits.argmax())
        if on_step is not None:
            on_step(y)
        if eos is not None and y == eos:
            break
        out.append(y)
        token = torch.tensor([[y]])
    return out


def calibrate_heads(lm, tokenizer, shape: ModelShape, *, lengths=(512, 1024, 1536, 2048),
                    depths=(0.1, 0.3, 0.5, 0.7, 0.9), needles=NEEDLES, max_new_tokens: int = 32,
                    min_recall: float | None = 0.5, progress: bool = True) -> dict:
    """Score every query head by semantic retrieval; the ``retrieval_heads`` artifact."""
    L, H, n_rep = shape.num_layers, shape.num_q_heads, shape.group_size
    total = torch.zeros(L, H, dtype=torch.float64)
    counted = trials = 0
    step_mass = torch.zeros(L, H, dtype=torch.float64)
    span = (0, 0)

    def tap(module, query, key, value, mask, scaling, **kw):
        if query.shape[2] == 1:  # a decode step: attention mass on the needle, per head
            row = window_attention(query[0], key[0], n_rep, scale=scaling)[:, 0]  # [H, kv]
            step_mass[module.layer_idx] = row[:, span[0]:span[1]].sum(dim=-1).double()
        return base_attention(module, query, key, value, mask, scaling, **kw)

    grid = [(n, length, d) for n in needles for length in lengths for d in depths]
    with tap_attention(lm, tap):
        for i, (needle, length, depth) in enumerate(_progress(grid, len(grid), "retrieval heads", progress)):
            probe = build_probe(tokenizer, needle, length, depth, offset=7919 * i)
            span = probe.needle_span
            needle_ids = probe.input_ids[span[0]:span[1]]
            trial = torch.zeros(L, H, dtype=torch.float64)

            def on_step(y: int, needle_ids=needle_ids, trial=trial) -> None:
                c = needle_ids.count(y)
                if c:
                    trial.add_(c * step_mass)

            out = _greedy(lm, probe.input_ids, max_new_tokens, tokenizer.eos_token_id, on_step)
            trials += 1
            recall = rouge1_recall(tokenizer.decode(out, skip_special_tokens=True), needle.answer)
            if min_recall is None or recall > min_recall:
                total += trial
                counted += 1
    if counted == 0:
        raise RuntimeError(f"none of the {trials} probes was answered (ROUGE-1 recall > {min_recall}); "
                           "retrieval heads cannot be scored on this model with these probes")
    scores = (total / counted).tolist()
    ranked = [sorted(range(H), key=lambda h, row=row: (-row[h], h)) for row in scores]
    artifact = {
        "kind": "retrieval_heads", "version": VERSION, "model": shape.name or "unnamed",
        "num_layers": L, "num_heads": H, "scores": scores, "ranked": ranked,
        "calibration": {"method": "CompressKV semantic retrieval score (arXiv 2508.02401 3.1)",
                        "trials": trials, "counted": counted, "lengths": list(lengths), "depths": list(depths),
                        "needles": len(needles), "max_new_tokens": max_new_tokens, "min_recall": min_recall,
                        "haystack": "pydoc_data.topics"},
    }
    check_artifact(artifact, "retrieval_heads")
    return artifact


# --------------------------------------------------------------------------- layer budgets


def layer_datasets(tokenizer, length: int, per_dataset: int, seed: int = 0) -> dict[str, list[list[int]]]:
    """Offline stand-ins for LongBench's task families, ``per_dataset`` prompts each."""
    rng = random.Random(seed)
    text = haystack_text()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def chunk(room: int) -> list[int]:
        ids = tokenizer.encode(text[rng.randrange(0, len(text) // 2):][: room * 8], add_special_tokens=False)
        return ids[:room]

    def kv_lookup() -> list[int]:
        pairs = [(f"{rng.randrange(16**8):08x}", f"{rng.randrange(16**8):08x}") for _ in range(length // 24)]
        key, value = rng.choice(pairs)
        body = "\n".join(f'"{k}": "{v}"' for k, v in pairs)
        ids = tokenizer.encode(f"JSON data:\n{body}\n\nThe value of key \"{key}\" is \"", add_special_tokens=False)
        return bos + ids[-(length - len(bos)):]

    data: dict[str, list[list[int]]] = {"needle_qa": [], "kv_lookup": [], "continuation": []}
    for i in range(per_dataset):
        needle = NEEDLES[i % len(NEEDLES)]
        data["needle_qa"].append(build_probe(tokenizer, needle, length, rng.random(), offset=rng.randrange(10**6)).input_ids)
        data["kv_lookup"].append(kv_lookup())
        data["continuation"].append(bos + chunk(length - len(bos)))
    return data


def calibrate_layers(lm, tokenizer, shape: ModelShape, policy: ir.Policy, *, budget: int = 32, length: int = 1536,
                     per_dataset: int = 4, max_new_tokens: int = 24, progress: bool = True) -> dict:
    """Per-layer eviction-error shares; the ``layer_budgets`` artifact."""
    calib_policy = replace(policy, layers=ir.Uniform(), overrides=()).with_budget(budget)
    L = shape.num_layers
    datasets = layer_datasets(tokenizer, length, per_dataset)
    shares_per_dataset = {}
    jobs = [(name, ids) for name, prompts in datasets.items() for ids in prompts]
    errors = {name: torch.zeros(L, dtype=torch.float64) for name in datasets}
    state: dict = {}

    def tap(module, query, key, value, mask, scaling, **kw):
        out, weights = base_attention(module, query, key, value, mask, scaling, **kw)
        layer = module.layer_idx
        if query.shape[2] > 1:  # prefill of all but the last token: choose what the shadow cache keeps
            pipe = state["pipe"]
            inputs = LayerInputs(key[0], value[0], query[0, :, -pipe.window:] if pipe.window else None)
            state["kept"][layer] = pipe.compress(layer, inputs).positions  # [H_kv, K]
            return out, weights
        kept = state["kept"][layer]  # -1 pads heads that keep fewer (pooled budgets)
        new = torch.arange(state["n_prefill"], key.shape[2]).expand(kept.shape[0], -1)
        pos = torch.cat([kept, new], dim=1)
        idx = pos.clamp_min(0)[None, :, :, None].expand(1, -1, -1, key.shape[-1])
        k_c, v_c = key.gather(2, idx), value.gather(2, idx)
        pad = torch.zeros(pos.shape, dtype=query.dtype).masked_fill(pos < 0, float("-inf"))
        mask = pad.repeat_interleave(shape.group_size, dim=0)[None, :, None, :]  # [1, H, 1, K]
        out_c, _ = base_attention(module, query, k_c, v_c, mask, scaling, **kw)
        o = module.o_proj(out.reshape(1, 1, -1))
        o_c = module.o_proj(out_c.reshape(1, 1, -1))
        errors[state["dataset"]][layer] += float((o_c - o).norm() / (o.norm() + 1e-5))
        return out, weights

    with tap_attention(lm, tap):
        for name, ids in _progress(jobs, len(jobs), "layer eviction error", progress):
            n_prefill = len(ids) - 1
            state.update(dataset=name, n_prefill=n_prefill, kept={},
                         pipe=compile_pipeline(calib_policy, shape, n_prefill))
            _greedy(lm, ids, max_new_tokens, None)
    for name, err in errors.items():
        shares_per_dataset[name] = (err / err.sum()).tolist() if err.sum() > 0 else [1.0 / L] * L
    mean = torch.tensor(list(shares_per_dataset.values()), dtype=torch.float64).mean(dim=0)
    shares = (mean / mean.sum()).tolist()
    shares[-1] = max(0.0, 1.0 - sum(shares[:-1]))  # exact sum despite float rounding
    artifact = {
        "kind": "layer_budgets", "version": VERSION, "model": shape.name or "unnamed", "num_layers": L,
        "shares": shares,
        "calibration": {"method": "CompressKV eviction-error allocation (arXiv 2508.02401 3.3)",
                        "policy": calib_policy.to_kvp(), "budget": budget, "length": length,
                        "prompts_per_dataset": per_dataset, "max_new_tokens": max_new_tokens,
                        "shares_per_dataset": shares_per_dataset},
    }
    check_artifact(artifact, "layer_budgets")
    return artifact
