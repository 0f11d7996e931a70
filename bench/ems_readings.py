"""EMS's Global-Local score, reading by reading, against its baselines.

EMS (arXiv 2412.08521) has no public code and its method section is not
public; what is known (the abstract, the public reviews: per-head ``s_Glo``
and ``s_Loc`` "mean-aligned", then combined, one review's formula beginning
``max(``) leaves the combination and the causal-bias correction open. Each
candidate below is one reading, written in the policy language; all run on
the same needle prompts, sharing one prefill per prompt, at several budgets,
beside SnapKV and StreamingLLM. The chosen reading and these figures are in
``policies/ems.kvp``.

The haystack and the needles are ones the repository's tests never use (a
licence text shipped with the operating system, or any text file given with
``--haystack``), so no policy is tuned to the usual prompts.

    .venv/bin/python bench/ems_readings.py                       # 2k tokens, 5 depths, 10/25/50 %
    .venv/bin/python bench/ems_readings.py --lengths 2048 4096 --budgets 2% 10%

Writes ``bench/results/ems_readings.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_HAYSTACK = Path("/usr/share/common-licenses/GPL-3")

EMS_TAIL = """
per head {
  keep top importance
  merge similar(keys, cosine > 0.9) into centers, cover=0.95
  evict rest into zero_class
}
"""


NO_MERGE_TAIL = """
per head {
  keep top importance
  evict rest
}
"""


def reading(name: str, global_term: str, combine: str, description: str, merge: bool = True,
            similarity: str = "keys", pool: str = "max(7)") -> str:
    """``combine`` names a normaliser applied to ``(g, l)``, or is a whole expression in g and l;
    ``similarity`` what the merge compares (``keys`` or ``kv``: cos(K) * cos(V))."""
    importance = combine if "(" in combine else f"{combine}(g, l)"
    tail = (EMS_TAIL if merge else NO_MERGE_TAIL).replace("similar(keys,", f"similar({similarity},")
    return (f'policy {name}\ndescription "{description}"\nbudget 10%\nkeep sink 4, recent 32\n'
            f"score g = {global_term}\nscore l = local(window=32, pool={pool})\n"
            f"score importance = {importance}\n{tail}")


READINGS = {
    "ems_mean_sum": reading("ems_mean_sum", "global(norm=mean)", "mean_align",
                            "per-key mean over visible queries, aligned and added (the first reading)"),
    "ems_mean_max": reading("ems_mean_max", "global(norm=mean)", "max_align",
                            "per-key mean over visible queries, aligned, max"),
    "ems_uniform_sum": reading("ems_uniform_sum", "global(norm=uniform)", "mean_align",
                               "observed / causally expected attention, aligned and added"),
    "ems_uniform_max": reading("ems_uniform_max", "global(norm=uniform)", "max_align",
                               "observed / causally expected attention, aligned, max"),
    "ems_sum_sum": reading("ems_sum_sum", "global()", "mean_align", "plain accumulation (H2O), aligned and added"),
    "ems_sum_max": reading("ems_sum_max", "global()", "max_align", "plain accumulation (H2O), aligned, max"),
    "ems_rank_max": reading("ems_rank_max", "global(norm=uniform)", "max_align(rank(g), rank(l))",
                            "observed / expected attention and window attention, each ranked, max"),
    "ems_local_led": reading("ems_local_led", "global(norm=uniform)", "zscore(l) + 0.3 * zscore(g)",
                             "window attention led, the global term as a z-scored tie-breaker"),
    # what the public reviews add: aligned scores combined by a max, redundancy cos(K) * cos(V)
    "ems_mean_max_kv": reading("ems_mean_max_kv", "global(norm=mean)", "max_align",
                               "per-key mean, aligned, max; merge on cos(K) * cos(V)", similarity="kv"),
    "ems_uniform_max_kv": reading("ems_uniform_max_kv", "global(norm=uniform)", "max_align",
                                  "observed / expected attention, aligned, max; merge on cos(K) * cos(V)",
                                  similarity="kv"),
    "ems_rank_max_kv_span": reading("ems_rank_max_kv_span", "global(norm=uniform)", "max_align(rank(g), rank(l))",
                                    "observed / expected and window attention ranked, max; window attention "
                                    "max-pooled over 25 tokens; merge on cos(K) * cos(V)",
                                    similarity="kv", pool="max(25)"),
    "ems_mean_max_kv_span": reading("ems_mean_max_kv_span", "global(norm=mean)", "max_align",
                                    "per-key mean, aligned, max, window attention max-pooled over 25 tokens; "
                                    "merge on cos(K) * cos(V)", similarity="kv", pool="max(25)"),
}

# both answered by the full cache at every depth of the default lengths on the
# GPL-3 haystack (a differently worded code word was not: the model's failure,
# not the cache's, so it would measure nothing)
NEEDLES = [
    ("The special magic number is 8305217.", "What is the special magic number?", "8305217"),
    ("Mary's favourite colour is turquoise.", "What is Mary's favourite colour?", "turquoise"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048], help="prompt lengths in tokens (default 2048)")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                    help="needle depths in [0, 1] (default 0.1 0.3 0.5 0.7 0.9)")
    ap.add_argument("--budgets", nargs="+", default=["10%", "25%", "50%"], help="budgets (default 10%% 25%% 50%%)")
    ap.add_argument("--modes", nargs="+", default=["query-aware"], choices=["query-aware", "context-only"],
                    help="question compressed with the context, or after it (default query-aware)")
    ap.add_argument("--readings", nargs="*", default=list(READINGS), choices=list(READINGS),
                    help="which EMS readings (default: all)")
    ap.add_argument("--baselines", nargs="*", default=["snapkv", "streamingllm"],
                    help="shipped policies run beside them (default snapkv streamingllm)")
    ap.add_argument("--no-merge", action="store_true",
                    help="the readings without EMS's merge rule (keep top, evict the rest): the score alone")
    ap.add_argument("--extra", nargs="*", default=[], help=".kvp files run beside them")
    ap.add_argument("--needles", type=int, default=len(NEEDLES), choices=range(1, len(NEEDLES) + 1),
                    help=f"how many of the {len(NEEDLES)} needles (a 7-digit code, a one-word answer; default all)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per answer (default 16)")
    ap.add_argument("--haystack", default=str(DEFAULT_HAYSTACK), help="a text file (default: the GPL-3 text)")
    ap.add_argument("--out", default=str(HERE / "results" / "ems_readings.json"))
    args = ap.parse_args(argv)

    from kvpolicy.dsl.parser import parse
    from kvpolicy.eval import evaluate as ev
    from kvpolicy.hf.models import load_model
    from kvpolicy.lang.combinators import Policy
    from kvpolicy.lang.registry import load

    haystack = Path(args.haystack)
    if not haystack.is_file():
        print(f"no haystack at {haystack}: pass --haystack FILE", file=sys.stderr)
        return 2
    texts = {r: READINGS[r] if not args.no_merge else READINGS[r].replace(EMS_TAIL, NO_MERGE_TAIL)
             for r in args.readings}
    policies = [Policy.of(parse(texts[r], f"<{r}>")) for r in args.readings]
    policies += [load(name) for name in args.baselines] + [load(path) for path in args.extra]
    batch = [ev.Entry("full", load("full"))]
    batch += [ev.Entry(f"{p.name}@{b}", p.with_budget(b)) for p in policies for b in args.budgets]
    needles = [ev.NeedleSpec(*n) for n in NEEDLES[:args.needles]]
    lm, tok, shape = load_model()
    result = ev.niah(lm, tok, shape, batch, lengths=args.lengths, depths=args.depths, modes=tuple(args.modes),
                     needles=needles, haystack=haystack.read_text(encoding="utf-8"),
                     max_new_tokens=args.max_new_tokens)
    cases = result["cases"]
    total = len(cases) // len(batch)
    print(f"\nNIAH found, of {total} cases per cell ({len(args.lengths)} lengths x {len(args.depths)} depths x "
          f"{len(needles)} needles x {len(args.modes)} modes; haystack {haystack.name}):\n")
    names = ["full"] + [p.name for p in policies]
    width = max(map(len, names)) + 2
    print("policy".ljust(width) + "".join(b.rjust(7) for b in args.budgets))
    table = {}
    for name in names:
        row = {}
        for b in (["-"] if name == "full" else args.budgets):
            label = "full" if name == "full" else f"{name}@{b}"
            row[b] = sum(c["correct"] for c in cases if c["policy"] == label)
        table[name] = row
        cells = [str(row["-"]).rjust(7)] * len(args.budgets) if name == "full" else \
            [str(row[b]).rjust(7) for b in args.budgets]
        print(name.ljust(width) + "".join(cells))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = {**vars(args), "out": out.name, "haystack": haystack.name}  # no machine paths in results
    out.write_text(json.dumps({"args": shown, "cases_per_cell": total, "found": table,
                               "readings": texts, "cases": cases}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
