"""RULER-style synthetic tasks (Hsieh et al., arXiv 2404.06654), generated
offline with fixed seeds over the ``pydoc_data.topics`` haystack.

* ``multikey``: several needles "One of the special magic numbers for KEY is:
  N." with different keys; the question asks for one key's number.
* ``multivalue``: one key, several numbers; all must be returned.
* ``variable_tracking``: ``VAR X1 = N`` and a chain ``VAR X2 = X1 ...`` spread
  through the text; every variable holding ``N`` must be named.
* ``common_words``: a numbered word list where a few words repeat many times;
  the most common ones must be named.

A case scores the share of expected strings found in the answer (RULER's
string-match metric).
"""

from __future__ import annotations

import random

from kvpolicy.eval.evaluate import Case, _chat
from kvpolicy.eval.haystack import haystack_text
from kvpolicy.lang.errors import InputError

TASKS = ("multikey", "multivalue", "variable_tracking", "common_words")
WORDS = ("apple banana cherry delta ember falcon garnet harbor island jasper kettle lantern meadow nickel "
         "orchid pepper quartz river saddle timber umber velvet willow yarrow zephyr anchor bramble cobalt "
         "dune fennel glacier hazel ivory juniper kelp lilac maple nectar onyx pebble").split()


def _insert(tokenizer, length: int, sentences: list[str], rng: random.Random, reserve: int) -> str:
    """Haystack text of about ``length - reserve`` tokens with ``sentences`` at random depths."""
    hay = tokenizer.encode(haystack_text(), add_special_tokens=False)
    room = max(length - reserve - sum(len(tokenizer.encode(s, add_special_tokens=False)) + 2 for s in sentences), 1)
    start = rng.randrange(0, max(len(hay) - room, 1))
    body = hay[start:start + room]
    cuts = sorted(rng.randrange(0, len(body) + 1) for _ in sentences)
    parts, prev = [], 0
    for cut, sent in zip(cuts, sentences, strict=True):
        parts += [tokenizer.decode(body[prev:cut]), f" {sent} "]
        prev = cut
    parts.append(tokenizer.decode(body[prev:]))
    return "".join(parts)


def _case(tokenizer, context: str, question: str, expected, meta) -> Case:
    marker = "\u2063"
    head, tail = _chat(tokenizer, context + "\n\n" + marker + question).split(marker)
    return Case(tokenizer.encode(head, add_special_tokens=False), tokenizer.encode(tail, add_special_tokens=False),
                tuple(expected), meta)


def make_cases(tokenizer, task: str, length: int, samples: int, seed: int = 0) -> list[Case]:
    if task not in TASKS:
        raise InputError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    cases = []
    for i in range(samples):
        rng = random.Random(f"{task}-{length}-{seed}-{i}")
        meta = {"task": task, "length": length, "sample": i}
        number = lambda rng=rng: str(rng.randrange(10**6, 10**7))  # noqa: E731
        if task == "multikey":
            keys = rng.sample(WORDS, 4)
            values = [number() for _ in keys]
            sents = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values, strict=True)]
            j = rng.randrange(len(keys))
            ctx = _insert(tokenizer, length, sents, rng, 60)
            cases.append(_case(tokenizer, ctx, f"What is the special magic number for {keys[j]}?", [values[j]], meta))
        elif task == "multivalue":
            key = rng.choice(WORDS)
            values = [number() for _ in range(4)]
            sents = [f"One of the special magic numbers for {key} is: {v}." for v in values]
            ctx = _insert(tokenizer, length, sents, rng, 60)
            cases.append(_case(tokenizer, ctx, f"What are all the special magic numbers for {key}?", values, meta))
        elif task == "variable_tracking":
            value = str(rng.randrange(10**4, 10**5))
            names = [f"{''.join(rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ') for _ in range(5))}" for _ in range(4)]
            sents = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = {a}" for a, b in zip(names, names[1:], strict=False)]
            ctx = _insert(tokenizer, length, sents, rng, 60)
            q = f"Find all variables that are assigned the value {value} in the text above."
            cases.append(_case(tokenizer, ctx, q, names, meta))
        else:
            common = rng.sample(WORDS, 3)
            rare = [w for w in WORDS if w not in common]
            words = common * 12 + rng.sample(rare, min(len(rare), 20)) * 2
            rng.shuffle(words)
            n_tok = len(tokenizer.encode(" ".join(words), add_special_tokens=False))
            while n_tok < length - 80:
                more = common * 6 + rng.sample(rare, 10)
                words += more
                n_tok += len(tokenizer.encode(" ".join(more), add_special_tokens=False))
            rng.shuffle(words)
            ctx = "Below is a numbered list of words.\n" + "\n".join(f"{n + 1}. {w}" for n, w in enumerate(words))
            cases.append(_case(tokenizer, ctx, "What are the 3 most common words in the list above?", common, meta))
    return cases


def ruler(lm, tokenizer, shape, batch, *, tasks=TASKS, length: int = 2048, samples: int = 3,
          modes=("query-aware",), max_new_tokens: int = 32, progress: bool = True) -> dict:
    from kvpolicy.eval.evaluate import run_cases

    cases = [c for t in tasks for c in make_cases(tokenizer, t, length, samples)]
    records = run_cases(lm, tokenizer, shape, batch, cases, modes=modes, max_new_tokens=max_new_tokens,
                        progress=progress, desc="ruler")
    summary: dict = {}
    for r in records:
        g = summary.setdefault(r["policy"], {}).setdefault(f"{r['task']} {r['mode']}", [])
        g.append(r["score"])
    return {"task": "ruler", "cases": records,
            "summary": {p: {k: f"{sum(v) / len(v):.2f}" for k, v in g.items()} for p, g in summary.items()},
            "settings": {"tasks": list(tasks), "length": length, "samples": samples, "modes": list(modes),
                         "max_new_tokens": max_new_tokens}}
