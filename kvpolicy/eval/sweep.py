"""Budget curves: every policy at a grid of budgets on NIAH (two needles, both
modes), RULER multikey and perplexity, and the smallest budget at which each
policy keeps 90% of the full cache's score (``kvpolicy eval sweep``).

A task's *score* is in [0, 1] and higher is better: the share of NIAH or RULER
cases answered, and for perplexity ``ppl(full) / ppl(policy)`` (so 0.9 means
a perplexity 1.11x the full cache's). ``smallest_budget[task][policy]`` is
the first budget of the grid whose score is at least ``THRESHOLD`` times the
full cache's, or ``None`` when no budget of the grid reaches it.

Each prompt is prefilled once for all the policies and budgets (as in
:mod:`kvpolicy.eval.evaluate`), so the cost is one prefill per prompt plus, per
(policy, budget), its compression and a short greedy decode.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpolicy.eval import evaluate as ev
from kvpolicy.lang.budgets import ModelShape
from kvpolicy.lang.combinators import Policy
from kvpolicy.lang.compose import as_budget

BUDGETS = ("2%", "5%", "10%", "20%", "35%", "50%")
THRESHOLD = 0.9
# a 7-digit number and a one-word answer; the full cache answers both at every
# length and depth of the default grid (the sweep's "full" row shows it)
NEEDLES = (ev.NeedleSpec(),
           ev.NeedleSpec("Mary's favourite colour is turquoise.", "What is Mary's favourite colour?", "turquoise"))
TASKS = ("niah query-aware", "niah context-only", "ruler multikey", "ppl")


@dataclass(frozen=True)
class Point:
    """One policy at one budget of the grid."""

    policy: str
    budget: str

    @property
    def label(self) -> str:
        return f"{self.policy}@{self.budget}"


def grid(policies: list[Policy], budgets: list[str]) -> tuple[list[ev.Entry], dict[str, Point]]:
    """The full cache once, then every compressing policy at every budget."""
    from kvpolicy.lang.registry import load

    batch = [ev.Entry("full", load("full"))]
    points: dict[str, Point] = {}
    for p in policies:
        if p.selection is None:
            continue  # the full cache is already the reference row
        for b in budgets:
            point = Point(p.name, b)
            points[point.label] = point
            batch.append(ev.Entry(point.label, p.with_budget(as_budget(b))))
    return batch, points


def sweep(lm, tokenizer, shape: ModelShape, policies: list[Policy], *, budgets=BUDGETS, lengths=(2048, 4096),
          depths=(0.1, 0.3, 0.5, 0.7, 0.9), needles=NEEDLES, ruler_samples: int = 2, ruler_length: int = 2048,
          ppl_windows: int = 3, ppl_context: int = 2048, ppl_target: int = 256, max_new_tokens: int = 16, haystack: str | None = None,
          progress: bool = True) -> dict:
    from kvpolicy.eval.ruler import ruler

    batch, points = grid(policies, list(budgets))
    raw = {
        "niah": ev.niah(lm, tokenizer, shape, batch, lengths=lengths, depths=depths,
                        modes=("query-aware", "context-only"), needles=list(needles), haystack=haystack,
                        max_new_tokens=max_new_tokens, progress=progress),
        "ruler": ruler(lm, tokenizer, shape, batch, tasks=("multikey",), length=ruler_length,
                       samples=ruler_samples, max_new_tokens=max(max_new_tokens, 24), progress=progress),
        "ppl": ev.perplexity(lm, tokenizer, shape, batch, context=ppl_context, target=ppl_target,
                             windows=ppl_windows, progress=progress),
    }
    scores = task_scores(raw)
    return {"task": "sweep", "budgets": list(budgets), "threshold": THRESHOLD,
            "policies": sorted({p.policy for p in points.values()}, key=[p.name for p in policies].index),
            "full": {t: scores[t]["full"] for t in TASKS},
            "scores": {t: {label: s for label, s in scores[t].items() if label != "full"} for t in TASKS},
            "smallest_budget": smallest_budgets(scores, points, list(budgets)),
            "settings": {"lengths": list(lengths), "depths": list(depths), "needles": [vars(n) for n in needles],
                         "ruler_samples": ruler_samples, "ruler_length": ruler_length, "ppl_windows": ppl_windows,
                         "ppl_context": ppl_context, "ppl_target": ppl_target,
                         "max_new_tokens": max_new_tokens,
                         "haystack": "custom" if haystack else "pydoc_data.topics"},
            "raw": raw}


def task_scores(raw: dict) -> dict[str, dict[str, float]]:
    """``{task: {label: score in [0, 1]}}`` from the raw results."""
    out: dict[str, dict[str, float]] = {t: {} for t in TASKS}
    sums: dict[tuple[str, str], list[float]] = {}
    for c in raw["niah"]["cases"]:
        sums.setdefault((f"niah {c['mode']}", c["policy"]), []).append(float(c["correct"]))
    for c in raw["ruler"]["cases"]:
        sums.setdefault((f"ruler {c['task']}", c["policy"]), []).append(float(c["score"]))
    for (task, label), v in sums.items():
        out[task][label] = sum(v) / len(v)
    full = raw["ppl"]["ppl"]["full"]
    out["ppl"] = {label: full / ppl for label, ppl in raw["ppl"]["ppl"].items()}
    return out


def smallest_budgets(scores: dict, points: dict[str, Point], budgets: list[str]) -> dict[str, dict[str, str | None]]:
    """Per task and policy, the first budget whose score reaches THRESHOLD x full."""
    out: dict[str, dict[str, str | None]] = {}
    rank = {b: i for i, b in enumerate(budgets)}
    for task in TASKS:
        need = THRESHOLD * scores[task]["full"] - 1e-9  # 0.9 * 0.8 is 0.7200000000000001 in floats
        row: dict[str, str | None] = dict.fromkeys((p.policy for p in points.values()), None)
        for label, point in sorted(points.items(), key=lambda kv: rank[kv[1].budget]):  # smallest budget first
            if row[point.policy] is None and scores[task].get(label, 0.0) >= need > 0:
                row[point.policy] = point.budget
        out[task] = row
    return out


def table(result: dict) -> str:
    """Two tables as text: the smallest budget per task, then every score."""
    tasks = TASKS
    width = max(len(p) for p in result["policies"] + ["policy"]) + 2
    none = f">{result['budgets'][-1]}"
    lines = [f"smallest budget with >= {result['threshold']:.0%} of the full cache's score", "",
             "policy".ljust(width) + "".join(f"{t:>20}" for t in tasks),
             "full (score)".ljust(width) + "".join(f"{result['full'][t]:>20.2f}" for t in tasks)]
    for p in result["policies"]:
        lines.append(p.ljust(width) + "".join(f"{result['smallest_budget'][t][p] or none:>20}" for t in tasks))
    for t in tasks:
        lines += ["", f"{t}: score by budget (full cache {result['full'][t]:.2f})",
                  "policy".ljust(width) + "".join(f"{b:>7}" for b in result["budgets"])]
        for p in result["policies"]:
            cells = [result["scores"][t].get(f"{p}@{b}") for b in result["budgets"]]
            lines.append(p.ljust(width) + "".join("      -" if c is None else f"{c:>7.2f}" for c in cells))
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The smallest-budget table in Markdown (README)."""
    none = f">{result['budgets'][-1]}"
    head = "| policy | " + " | ".join(TASKS) + " |"
    rows = [head, "|" + "---|" * (len(TASKS) + 1),
            "| full cache (score) | " + " | ".join(f"{result['full'][t]:.2f}" for t in TASKS) + " |"]
    for p in result["policies"]:
        rows.append(f"| {p} | " + " | ".join(result["smallest_budget"][t][p] or none for t in TASKS) + " |")
    return "\n".join(rows)
