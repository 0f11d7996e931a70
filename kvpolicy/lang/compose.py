"""The policy language from Python: the same IR, built with functions.

Method constructors read the shipped policy of that name (the ``.kvp`` file is
the one source of truth for a method's defaults) and apply the
hyperparameters given::

    import kvpolicy as kp
    p = kp.snapkv(budget=256)
    q = kp.ems(budget="2%").with_layers(kp.pyramid(beta=20)).with_override(range(2), "100%")
    print(q.to_kvp())

Building blocks make new policies; arithmetic on scores builds weighted sums::

    p = kp.policy(
        "mine", budget="5%", keep=dict(sink=4, recent=32),
        scores=dict(g=kp.global_(norm="mean"), l=kp.local(32, pool=kp.max_pool(7)),
                    s=kp.mean_align("g", "l") - 0.1 * kp.key_norm()),
        select=kp.per_head("s"),
    )
"""

from __future__ import annotations

from dataclasses import replace

from kvpolicy.lang import ir
from kvpolicy.lang.combinators import Policy, as_budget
from kvpolicy.lang.validate import validate

# --------------------------------------------------------------------------- budgets


# --------------------------------------------------------------------------- score terms


def global_(norm: str = "sum", heads: ir.Heads = ir.AllHeads(), gqa: str = "mean") -> ir.GlobalAttention:
    """``global(norm=..., heads=..., gqa=...)`` — see :class:`kvpolicy.lang.ir.GlobalAttention`."""
    return ir.GlobalAttention(norm, heads, gqa)


def local(window: int, pool: ir.Pool | None = None, heads: ir.Heads = ir.AllHeads(), gqa: str = "mean") -> ir.LocalAttention:
    """``local(window=..., pool=..., heads=..., gqa=...)`` — see :class:`kvpolicy.lang.ir.LocalAttention`."""
    return ir.LocalAttention(window, pool, heads, gqa)


def avg_pool(size: int) -> ir.Pool:
    return ir.Pool("avg", size)


def max_pool(size: int) -> ir.Pool:
    return ir.Pool("max", size)


def retrieval(artifact: str | None = None, top: int = 4) -> ir.RetrievalHeads:
    return ir.RetrievalHeads(top, artifact)


def key_norm() -> ir.KeyNorm:
    return ir.KeyNorm()


def value_norm() -> ir.ValueNorm:
    return ir.ValueNorm()


def recency() -> ir.Recency:
    return ir.Recency()


def redundancy(threshold: float = 0.5) -> ir.Redundancy:
    return ir.Redundancy(threshold)


def mean_align(*terms) -> ir.Normalize:
    return ir.Normalize("mean_align", tuple(ir._as_expr(t) for t in terms))


def max_align(*terms) -> ir.Normalize:
    """``max_align(a, b, ...)``: each term rescaled to the first's mean, then
    the largest per token."""
    return ir.Normalize("max_align", tuple(ir._as_expr(t) for t in terms))


def zscore(term) -> ir.Normalize:
    return ir.Normalize("zscore", (ir._as_expr(term),))


def rank(term) -> ir.Normalize:
    return ir.Normalize("rank", (ir._as_expr(term),))


# --------------------------------------------------------------------------- selection, layers


def similar(target: str = "keys", metric: str = "cosine", threshold: float = 0.9, weight: str = "score") -> ir.MergeSimilar:
    return ir.MergeSimilar(target, metric, float(threshold), weight)


def per_head(score: str, *, merge: ir.MergeSimilar | None = None, zero_class: bool = False, p: float | None = None) -> ir.Selection:
    return ir.Selection("head", ir.KeepTop(score, p), merge, ir.Evict("zero_class" if zero_class else "drop"))


def per_layer(score: str, *, merge: ir.MergeSimilar | None = None, zero_class: bool = False, p: float | None = None) -> ir.Selection:
    return ir.Selection("layer", ir.KeepTop(score, p), merge, ir.Evict("zero_class" if zero_class else "drop"))


def pooled_heads(score: str, *, safeguard: float = 0.2, merge: ir.MergeSimilar | None = None,
                 zero_class: bool = False, p: float | None = None) -> ir.Selection:
    return ir.Selection("pooled", ir.KeepTop(score, p), merge, ir.Evict("zero_class" if zero_class else "drop"), safeguard)


def uniform() -> ir.Uniform:
    return ir.Uniform()


def pyramid(beta: float = 20) -> ir.Pyramid:
    return ir.Pyramid(float(beta))


def explicit(budgets) -> ir.Explicit:
    return ir.Explicit(tuple(int(b) for b in budgets))


def adaptive(artifact: str | None = None) -> ir.Adaptive:
    return ir.Adaptive(artifact)


def policy(name: str, budget, *, description: str = "", keep: dict | None = None, scores: dict | None = None,
           select: ir.Selection | None = None, layers: ir.LayerSchedule = ir.Uniform(),
           trigger: ir.Trigger = ir.Trigger()) -> Policy:
    """A new policy from parts; checked like a parsed one."""
    p = Policy(
        name=name,
        budget=as_budget(budget),
        description=description,
        protect=ir.Protect(**(keep or {})),
        scores=tuple(ir.ScoreDef(k, ir._as_expr(v)) for k, v in (scores or {}).items()),
        selection=select,
        layers=layers,
        trigger=trigger,
    )
    validate(p)
    return p


# --------------------------------------------------------------------------- method constructors


def _shipped(name: str, budget) -> Policy:
    """The shipped policy ``name`` (already checked when read), at ``budget`` if given."""
    from kvpolicy.lang.registry import load

    p = load(name)
    return p if budget is None else p.with_budget(budget)


def _map_local(p: ir.Policy, fn) -> tuple[ir.ScoreDef, ...]:
    """Apply ``fn`` to every ``local()`` term of every score."""
    def leaf(e: ir.ScoreExpr) -> ir.ScoreExpr:
        return fn(e) if isinstance(e, ir.LocalAttention) else e

    return tuple(ir.ScoreDef(d.name, ir.map_terms(d.expr, leaf)) for d in p.scores)


def with_window(p: ir.Policy, window: int) -> Policy:
    """Set the observation window: every ``local()`` term's window and the
    protected recent tokens (SnapKV-family methods keep their window)."""
    return Policy.of(p)._checked(
        scores=_map_local(p, lambda t: replace(t, window=window)),
        protect=replace(p.protect, recent=window),
    )


def with_pool(p: ir.Policy, pool: ir.Pool | None) -> Policy:
    return Policy.of(p)._checked(scores=_map_local(p, lambda t: replace(t, pool=pool)))


def full() -> Policy:
    """The uncompressed cache."""
    return _shipped("full", None)


def streamingllm(budget=None, *, sink: int | None = None) -> Policy:
    p = _shipped("streamingllm", budget)
    return p if sink is None else p.with_keep(sink=sink)


def h2o(budget=None, *, recent: int | None = None) -> Policy:
    p = _shipped("h2o", budget)
    return p if recent is None else p.with_keep(recent=recent)


def _windowed(name: str, budget, window, pool) -> Policy:
    p = _shipped(name, budget)
    if window is not None:
        p = with_window(p, window)
    if pool is not None:
        p = with_pool(p, pool)
    return p


def snapkv(budget=None, *, window: int | None = None, pool: ir.Pool | None = None) -> Policy:
    return _windowed("snapkv", budget, window, pool)


def spankv(budget=None, *, window: int | None = None, pool: ir.Pool | None = None) -> Policy:
    """SnapKV with span pooling (``policies/spankv.kvp``: max pool 25)."""
    return _windowed("spankv", budget, window, pool)


def pyramidkv(budget=None, *, window: int | None = None, pool: ir.Pool | None = None, beta: float | None = None) -> Policy:
    p = _windowed("pyramidkv", budget, window, pool)
    return p if beta is None else p.with_layers(ir.Pyramid(float(beta)))


def adakv(budget=None, *, window: int | None = None, pool: ir.Pool | None = None, safeguard: float | None = None) -> Policy:
    p = _windowed("adakv", budget, window, pool)
    return p if safeguard is None else p.with_selection(replace(p.selection, safeguard=safeguard))


def ems(budget=None, *, window: int | None = None, threshold: float | None = None) -> Policy:
    p = _windowed("ems", budget, window, None)
    if threshold is not None:
        p = p.with_selection(replace(p.selection, merge=replace(p.selection.merge, threshold=float(threshold))))
    return p


def compresskv(budget=None, *, window: int | None = None, top: int | None = None) -> Policy:
    p = _windowed("compresskv", budget, window, None)
    if top is not None:
        p = p._checked(scores=_map_local(p, lambda t: replace(t, heads=replace(t.heads, top=top))))
    return p


def rkv(budget=None, *, every: int | None = None) -> Policy:
    """R-KV (``policies/rkv.kvp``): importance minus redundancy, compressed
    again every ``every`` decoded tokens (128 shipped)."""
    p = _shipped("rkv", budget)
    return p if every is None else p.with_trigger(prefill=p.trigger.prefill, decode_every=every)


METHODS = {
    "full": full, "streamingllm": streamingllm, "h2o": h2o, "snapkv": snapkv, "pyramidkv": pyramidkv,
    "adakv": adakv, "ems": ems, "compresskv": compresskv, "spankv": spankv,
    "rkv": rkv,
}
