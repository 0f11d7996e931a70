"""The README's results table, printed from the JSON in bench/results/.

Run: .venv/bin/python bench/report.py   (after the eval commands in README § Results)
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def niah_columns(result: dict | None, mode: str) -> dict[str, dict[int, str]]:
    out: dict[str, dict[int, str]] = {}
    for c in (result or {}).get("cases", []):
        if c["mode"] != mode:
            continue
        hit, n = out.setdefault(c["policy"], {}).get(c["length"], (0, 0))
        out[c["policy"]][c["length"]] = (hit + int(c["correct"]), n + 1)
    return {p: {k: f"{h}/{n}" for k, (h, n) in g.items()} for p, g in out.items()}


def main() -> None:
    qa = niah_columns(load("niah_query_aware_smollm2.json"), "query-aware")
    co = niah_columns(load("niah_context_only_smollm2.json"), "context-only")
    ppl = (load("ppl_smollm2.json") or {}).get("ratio_to_full") or {}
    ruler = load("ruler_smollm2.json") or {"cases": []}
    ruler_scores: dict[str, dict[str, list[float]]] = {}
    for c in ruler["cases"]:
        ruler_scores.setdefault(c["policy"], {}).setdefault(c["task"], []).append(c["score"])
    tasks = sorted({t for g in ruler_scores.values() for t in g})
    labels = list(dict.fromkeys([*qa, *co, *ppl, *ruler_scores]))
    head = ["policy", "NIAH 2k QA", "NIAH 4k QA", "NIAH 2k CO", "NIAH 4k CO", "ppl / full",
            *[f"RULER {t}" for t in tasks]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for p in labels:
        row = [p, qa.get(p, {}).get(2048, "-"), qa.get(p, {}).get(4096, "-"), co.get(p, {}).get(2048, "-"),
               co.get(p, {}).get(4096, "-"), f"{ppl[p]:.3f}" if p in ppl else "-"]
        row += [f"{sum(v) / len(v):.2f}" if (v := ruler_scores.get(p, {}).get(t)) else "-" for t in tasks]
        print("| " + " | ".join(row) + " |")
    over = sorted(RESULTS.glob("prefill_overhead_*.json"))
    for path in over:
        data = json.loads(path.read_text())
        print(f"\nPrefill time with capture + compression / plain prefill ({data['model']}, {data['length']} tokens, "
              f"budget {data['budget']}, median of {data['repeats']}, {data['device']}):\n")
        print("| policy | plain prefill s | with compression s | compression alone s | ratio |")
        print("|---|---|---|---|---|")
        for r in data["rows"]:
            print(f"| {r['policy']} | {r['prefill_s']:.2f} | {r['with_compression_s']:.2f} | "
                  f"{r['compress_only_s']:.2f} | {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()
