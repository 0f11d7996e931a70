"""Hypothesis strategies that generate valid policy IR."""

from __future__ import annotations

from hypothesis import strategies as st

from kvpolicy.lang import ir

KEYWORDS = ["policy", "budget", "keep", "score", "per", "layers", "layer", "trigger", "top", "merge",
            "evict", "rest", "into", "tokens", "every", "prefill", "global", "local", "head", "all"]
names = st.one_of(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True), st.sampled_from(KEYWORDS))
weights = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)

heads = st.one_of(st.just(ir.AllHeads()), st.builds(ir.RetrievalHeads, top=st.integers(1, 16)))
pools = st.one_of(st.none(), st.builds(ir.Pool, st.sampled_from(ir.POOL_KINDS), st.integers(0, 7).map(lambda k: 2 * k + 1)))


def leaves(defined: list[str], max_window: int):
    options = [
        st.builds(ir.GlobalAttention, st.sampled_from(ir.GLOBAL_NORMS), heads, st.sampled_from(ir.GQA_REDUCES)),
        st.builds(ir.LocalAttention, st.integers(1, max_window), pools, heads, st.sampled_from(ir.GQA_REDUCES)),
        st.just(ir.KeyNorm()), st.just(ir.ValueNorm()), st.just(ir.Recency()),
        st.builds(ir.Redundancy, st.sampled_from([0.5, 0.25, 0.9, 0.0])),
    ]
    if defined:
        options.append(st.sampled_from(defined).map(ir.ScoreRef))
    return st.one_of(options)


def exprs(defined: list[str], max_window: int):
    def extend(children):
        return st.one_of(
            st.lists(st.tuples(weights, children), min_size=1, max_size=3).map(lambda t: ir.WeightedSum(tuple(t))),
            st.builds(lambda k, a: ir.Normalize(k, tuple(a)), st.sampled_from(["mean_align", "max_align"]),
                      st.lists(children, min_size=2, max_size=3)),
            st.builds(lambda k, a: ir.Normalize(k, (a,)), st.sampled_from(["zscore", "rank"]), children),
        )

    return st.recursive(leaves(defined, max_window), extend, max_leaves=6)


@st.composite
def budgets(draw, min_tokens: int = 1) -> ir.Budget:
    if draw(st.booleans()):
        return ir.Budget(draw(st.integers(min_tokens, 100_000)), "tokens")
    amount = draw(st.one_of(st.integers(1, 100).map(float), st.floats(0.01, 100, allow_nan=False)))
    floor = draw(st.one_of(st.none(), st.integers(1, 512)))
    cap = draw(st.one_of(st.none(), st.integers(floor or 1, 100_000)))
    return ir.Budget(amount, "percent", floor, cap)


@st.composite
def selections(draw, score_names: list[str]) -> ir.Selection:
    unit = draw(st.sampled_from(["head", "layer", "pooled"]))
    keep = ir.KeepTop(draw(st.sampled_from(score_names)), draw(st.one_of(st.none(), st.floats(0.001, 1.0))))
    merge = None
    if draw(st.booleans()):
        target = draw(st.sampled_from(ir.MERGE_TARGETS))
        metric = "cosine" if target == "kv" else draw(st.sampled_from(ir.MERGE_METRICS))  # kv: cosines only
        threshold = draw(st.floats(-1, 1) if metric == "cosine" else st.floats(0, 100))
        merge = ir.MergeSimilar(target, metric, threshold,
                                draw(st.sampled_from(ir.MERGE_WEIGHTS)), draw(st.one_of(st.none(), st.floats(0.01, 1.0))))
    evict = ir.Evict(draw(st.sampled_from(["drop", "zero_class"])) if merge else "drop")
    safeguard = draw(st.floats(0, 1)) if unit == "pooled" else None
    return ir.Selection(unit, keep, merge, evict, safeguard)


@st.composite
def policies(draw) -> ir.Policy:
    budget = draw(budgets(min_tokens=80))
    sink, recent = draw(st.integers(0, 8)), draw(st.integers(0, 32))
    n_scores = draw(st.integers(0, 4))
    scores, defined = [], []
    for _ in range(n_scores):
        name = draw(names.filter(lambda n: n not in defined))
        scores.append(ir.ScoreDef(name, draw(exprs(defined, max_window=64))))
        defined.append(name)
    selection = draw(selections(defined)) if defined and (draw(st.booleans()) or not budget.is_full) else None
    if selection is None:
        budget = ir.Budget(100.0, "percent")
    layers = draw(st.one_of(
        st.just(ir.Uniform()), st.builds(ir.Pyramid, st.floats(1, 100)),
        st.lists(st.integers(1, 4096), min_size=1, max_size=8).map(lambda w: ir.Explicit(tuple(w))),
        st.just(ir.Adaptive()),
    ))
    singles = [ir.LayerOverride((i,), draw(budgets())) for i in draw(st.sets(st.integers(0, 40), max_size=5))]
    prefill = draw(st.booleans())
    every = draw(st.one_of(st.none(), st.integers(1, 10_000))) if prefill else draw(st.integers(1, 10_000))
    return ir.Policy(
        name=draw(names),
        budget=budget,
        description=draw(st.text(max_size=30)),
        protect=ir.Protect(sink, recent),
        scores=tuple(scores),
        selection=selection,
        layers=layers,
        overrides=ir.group_overrides(singles),
        trigger=ir.Trigger(prefill, every),
    )
