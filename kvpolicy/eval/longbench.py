"""LongBench (Bai et al., arXiv 2308.14508) on data the user supplies.

``DIR`` holds LongBench-format ``<dataset>.jsonl`` files, one object per line
with ``context``, ``input``, ``answers`` (list) and optionally
``all_classes``. Nothing is downloaded. Each dataset is scored with its
standard metric (LongBench's ``dataset2metric``): QA F1, ROUGE-L, classification
accuracy, retrieval / count accuracy, or code edit similarity, as a 0-100 mean
of the best score over the reference answers. Long contexts are truncated in
the middle to ``max_length`` tokens, as LongBench does.
"""

from __future__ import annotations

import difflib
import json
import re
import string
from collections import Counter
from pathlib import Path

from kvpolicy.eval.evaluate import Case, Entry, _chat, run_cases


def _normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def qa_f1(pred: str, ref: str, **_) -> float:
    p, r = _normalize(pred).split(), _normalize(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def rouge_l(pred: str, ref: str, **_) -> float:
    p, r = pred.lower().split(), ref.lower().split()
    if not p or not r:
        return 0.0
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def classification(pred: str, ref: str, all_classes=None, **_) -> float:
    hits = [c for c in (all_classes or []) if c in pred]
    hits = [c for c in hits if not any(c != o and c in o for o in hits)]
    return (1.0 / len(hits)) if ref in hits else 0.0


def number_match(pred: str, ref: str, **_) -> float:
    nums = re.findall(r"\d+", pred)
    target = re.findall(r"\d+", ref)
    if not nums or not target:
        return 0.0
    return sum(n == target[0] for n in nums) / len(nums)


def code_sim(pred: str, ref: str, **_) -> float:
    lines = [l for l in pred.lstrip("\n").split("\n") if not l.strip().startswith(("`", "#", "//"))]
    return difflib.SequenceMatcher(None, lines[0] if lines else "", ref).ratio()


METRICS = {
    **dict.fromkeys(["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"], qa_f1),
    **dict.fromkeys(["gov_report", "qmsum", "multi_news", "samsum"], rouge_l),
    "trec": classification, "passage_retrieval_en": number_match, "passage_count": number_match,
    **dict.fromkeys(["lcc", "repobench-p"], code_sim),
}


def read_dir(data_dir: str | Path) -> dict[str, list[dict]]:
    data_dir = Path(data_dir)
    files = sorted(data_dir.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no LongBench *.jsonl files in {data_dir}")
    out = {}
    for f in files:
        name = f.stem
        if name not in METRICS:
            raise ValueError(f"{f.name}: unknown LongBench dataset '{name}' (known: {', '.join(sorted(METRICS))})")
        rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        for i, row in enumerate(rows):
            missing = {"context", "input", "answers"} - set(row)
            if missing:
                raise ValueError(f"{f.name}:{i + 1}: missing {', '.join(sorted(missing))}")
        out[name] = rows
    return out


def longbench(lm, tokenizer, shape, batch: list[Entry], data_dir, *, max_length: int = 3500,
              max_new_tokens: int = 64, limit: int | None = None, progress: bool = True) -> dict:
    data = read_dir(data_dir)
    cases = []
    for name, rows in data.items():
        metric = METRICS[name]
        for i, row in enumerate(rows[:limit]):
            ids = tokenizer.encode(_chat(tokenizer, f"{row['context']}\n\nQuestion: {row['input']}"),
                                   add_special_tokens=False)
            if len(ids) > max_length:  # keep the start and the end, as LongBench does
                half = max_length // 2
                ids = ids[:half] + ids[-half:]

            def score(pred: str, row=row, metric=metric) -> float:
                return max(metric(pred, ref, all_classes=row.get("all_classes")) for ref in row["answers"])

            cases.append(Case(ids, [], tuple(row["answers"]), {"dataset": name, "index": i}, score))
    records = run_cases(lm, tokenizer, shape, batch, cases, max_new_tokens=max_new_tokens, progress=progress,
                        desc="longbench")
    summary: dict = {}
    for r in records:
        summary.setdefault(r["policy"], {}).setdefault(r["dataset"], []).append(r["score"])
    return {"task": "longbench", "cases": records,
            "summary": {p: {d: f"{100 * sum(v) / len(v):.1f}" for d, v in g.items()} for p, g in summary.items()},
            "settings": {"data": str(data_dir), "max_length": max_length, "max_new_tokens": max_new_tokens,
                         "limit": limit}}
