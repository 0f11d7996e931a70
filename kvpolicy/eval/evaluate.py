"""Evaluation on a real model: NIAH (query-aware and context-only) and
perplexity after a compressed context (ARCHITECTURE.md § Evaluation protocol).

Every prompt is prefilled once and the capture is shared by all policies
compared on it, so a comparison of many policies costs one prefill per prompt
plus, per policy, its compression and decoding. Results are plain dicts,
written as JSON with the resolved policy text, model, budgets, mode, prompt
lengths and per-case results.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from kvpolicy.eval.haystack import haystack_text
from kvpolicy.hf.generate import capture_needs, compress, decode, feed, prefill, stack_states
from kvpolicy.lang import ir
from kvpolicy.lang.budgets import ModelShape
from kvpolicy.lang.errors import InputError
from kvpolicy.lang.registry import load

DECODE_BATCH = 16  # policies decoded together per prompt (padded to the largest of them)


@dataclass(frozen=True)
class Entry:
    """One policy at one budget, as compared in a table."""

    label: str
    policy: ir.Policy

    @property
    def compresses(self) -> bool:
        return self.policy.selection is not None


def entries(names: list[str], budgets: list[str] | None) -> list[Entry]:
    """``--policy`` names or files x ``--budget`` values; ``full`` once."""
    from kvpolicy.lang.compose import as_budget

    out: list[Entry] = []
    for name in names:
        policy = load(name)
        if policy.selection is None or not budgets:
            out.append(Entry(policy.name, policy))
            continue
        for b in budgets:
            out.append(Entry(f"{policy.name}@{b}", policy.with_budget(as_budget(b))))
    return out


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc)


# --------------------------------------------------------------------------- NIAH


@dataclass(frozen=True)
class NeedleSpec:
    # the RULER/kvpress-style 7-digit needle; this phrasing is one the default
    # model answers with the full cache at every depth tried
    needle: str = "The special magic number is 4829175."
    question: str = "What is the special magic number?"
    answer: str = "4829175"


def niah_prompt(tokenizer, spec: NeedleSpec, length: int, depth: float, haystack: str | None = None,
                offset: int = 1000) -> tuple[list[int], list[int]]:
    """``(context_ids, question_ids)`` in the model's chat format: the user turn
    is the haystack with the needle at ``depth`` followed by the question; the
    split is where the context ends, so query-aware mode prefills both parts
    and context-only mode compresses the first before feeding the second."""
    hay = tokenizer.encode(haystack or haystack_text(), add_special_tokens=False)
    marker = "\u2063"  # an invisible separator that cannot occur in the text
    overhead = len(tokenizer.encode(_chat(tokenizer, spec.needle + marker + spec.question), add_special_tokens=False))
    room = max(length - overhead, 1)
    body = hay[offset:offset + room] if len(hay) > offset + room else hay[:room]
    cut = int(round(depth * len(body)))
    context = tokenizer.decode(body[:cut]) + " " + spec.needle + " " + tokenizer.decode(body[cut:])
    text = _chat(tokenizer, context + "\n\n" + marker + spec.question)
    head, tail = text.split(marker)
    return tokenizer.encode(head, add_special_tokens=False), tokenizer.encode(tail, add_special_tokens=False)


def chat_ids(tokenizer, user: str | list[dict]) -> list[int]:
    """A chat prompt's token ids, ending with the generation prompt: one user
    turn (``user`` a string) or a whole conversation (a list of messages)."""
    if isinstance(user, str):
        text = _chat(tokenizer, user)
    else:
        text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def _chat(tokenizer, user: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return user + "\nAnswer:"


@dataclass
class Case:
    """One prompt of a task: the context, the question after it, and the
    strings a correct answer contains (score = the share of them found,
    unless the task brings its own ``score(answer) -> [0, 1]``)."""

    context: list[int]
    question: list[int]
    expected: tuple[str, ...]
    meta: dict
    score: Callable[[str], float] | None = None


def run_cases(lm, tokenizer, shape: ModelShape, batch: list[Entry], cases: list[Case], *, modes=("query-aware",),
              max_new_tokens: int = 24, progress: bool = True, desc: str = "cases",
              decode_batch: int = DECODE_BATCH) -> list[dict]:
    """Each case once per mode: one prefill shared by every policy, then per
    policy its compression; (context-only: the question and) greedy decoding
    of up to ``decode_batch`` policies' caches at once (:func:`stack_states`),
    grouped by size so that little padding is decoded."""
    records = []
    bar = _progress(len(cases) * len(modes), desc, progress)
    for case in cases:
        for mode in modes:
            prompt = case.context + case.question if mode == "query-aware" else case.context
            window, acc = capture_needs([e.policy for e in batch], shape, len(prompt))
            ids = torch.tensor([prompt])
            t0 = time.perf_counter()
            cap = prefill(lm, ids, window=window, accumulate=acc)
            prefill_s = time.perf_counter() - t0
            states, compress_s = [], []
            for e in batch:
                t1 = time.perf_counter()
                states.append(compress(cap, e.policy, shape))
                compress_s.append(time.perf_counter() - t1)
            kept = [sum(st.kept[0]) for st in states]
            answers: list[str] = [""] * len(batch)
            order = sorted(range(len(batch)), key=kept.__getitem__)
            for start in range(0, len(order), decode_batch):
                group = order[start:start + decode_batch]
                state = stack_states([states[i] for i in group])
                logits = cap.last_logits.expand(len(group), -1)
                if mode == "context-only":
                    logits = feed(lm, state, torch.tensor([case.question] * len(group)))[:, -1]
                out = decode(lm, state, logits, max_new_tokens, tokenizer.eos_token_id)
                for row, i in enumerate(group):
                    answers[i] = tokenizer.decode(out[row].tolist(), skip_special_tokens=True)
                for i in group:
                    states[i] = None  # free each group's caches once decoded
            for e, text, slots, c_s in zip(batch, answers, kept, compress_s, strict=True):
                found = case.score(text) if case.score else sum(x in text for x in case.expected) / len(case.expected)
                records.append({
                    "policy": e.label, **case.meta, "prompt_tokens": len(prompt), "mode": mode, "answer": text,
                    "score": found, "correct": found == 1.0, "kept_slots": slots,
                    "full_slots": len(prompt) * shape.num_layers * shape.num_kv_heads,
                    "prefill_s": round(prefill_s, 4), "compress_s": round(c_s, 4),
                })
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return records


def niah(lm, tokenizer, shape: ModelShape, batch: list[Entry], *, lengths=(2048, 4096),
         depths=(0.1, 0.3, 0.5, 0.7, 0.9), modes=("query-aware", "context-only"), needles: list[NeedleSpec] | None = None,
         haystack: str | None = None, max_new_tokens: int = 24, progress: bool = True) -> dict:
    needles = needles or [NeedleSpec()]
    cases = []
    for length in lengths:
        for depth in depths:
            for k, spec in enumerate(needles):
                ctx, question = niah_prompt(tokenizer, spec, length, depth, haystack, offset=1000 + 7919 * k)
                cases.append(Case(ctx, question, (spec.answer,), {"length": length, "depth": depth, "needle": k}))
    records = run_cases(lm, tokenizer, shape, batch, cases, modes=modes, max_new_tokens=max_new_tokens,
                        progress=progress, desc="niah")
    return {"task": "niah", "cases": records, "summary": _summary(records, ("length", "mode")),
            "settings": {"lengths": list(lengths), "depths": list(depths), "modes": list(modes),
                         "needles": [vars(n) for n in needles], "max_new_tokens": max_new_tokens,
                         "haystack": "custom" if haystack else "pydoc_data.topics"}}


def _summary(cases: list[dict], keys: tuple[str, ...]) -> dict:
    out: dict = {}
    for c in cases:
        group = out.setdefault(c["policy"], {})
        key = " ".join(f"{c[k]}" for k in keys)
        hit, n = group.get(key, (0, 0))
        group[key] = (hit + int(c["correct"]), n + 1)
    return {p: {k: f"{h}/{n}" for k, (h, n) in g.items()} for p, g in out.items()}


# --------------------------------------------------------------------------- perplexity


def perplexity(lm, tokenizer, shape: ModelShape, batch: list[Entry], *, context: int = 2048, target: int = 256,
               windows: int = 3, text: str | None = None, progress: bool = True) -> dict:
    """Perplexity of ``target`` tokens after a ``context`` compressed by each
    policy, over ``windows`` disjoint stretches of text; ratio to the full cache."""
    ids = tokenizer.encode(text or haystack_text(), add_special_tokens=False)
    span = context + target
    if len(ids) < span:
        raise InputError(f"the text has {len(ids)} tokens, fewer than context + target = {span}")
    starts = [int(i * (len(ids) - span) / max(windows - 1, 1)) for i in range(windows)]
    nll = {e.label: 0.0 for e in batch}
    count = 0
    cases = []
    bar = _progress(windows, "ppl", progress)
    for s in starts:
        ctx = torch.tensor([ids[s:s + context]])
        tgt = torch.tensor([ids[s + context:s + span]])
        window, acc = capture_needs([e.policy for e in batch], shape, context)
        cap = prefill(lm, ctx, window=window, accumulate=acc)
        for e in batch:
            state = compress(cap, e.policy, shape)
            logits = torch.cat([cap.last_logits[:, None], feed(lm, state, tgt[:, :-1])], dim=1)
            loss = torch.nn.functional.cross_entropy(logits[0], tgt[0], reduction="sum").item()
            nll[e.label] += loss
            cases.append({"policy": e.label, "start": s, "nll_sum": loss, "tokens": target,
                          "kept_slots": sum(state.kept[0])})
        count += target
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    ppl = {label: math.exp(v / count) for label, v in nll.items()}
    full = next((ppl[e.label] for e in batch if not e.compresses), None)
    return {"task": "ppl", "ppl": ppl, "ratio_to_full": {k: v / full for k, v in ppl.items()} if full else None,
            "cases": cases, "settings": {"context": context, "target": target, "windows": windows,
                                          "text": "custom" if text else "pydoc_data.topics"}}


def table(result: dict) -> str:
    """The summary as aligned text: one row per policy, one column per group."""
    summary = result["summary"]
    cols = sorted({k for g in summary.values() for k in g}, key=lambda k: [float(x) if x.replace(".", "").isdigit() else x
                                                                          for x in k.split()])
    width = max(len(p) for p in summary) + 2
    lines = [" " * width + "  ".join(f"{c:>22}" for c in cols)]
    for p, g in summary.items():
        lines.append(f"{p:<{width}}" + "  ".join(f"{g.get(c, '-'):>22}" for c in cols))
    return "\n".join(lines)
