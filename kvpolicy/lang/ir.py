"""The policy IR: frozen dataclasses, the contract between front ends and back ends.

The parser (``kvpolicy.dsl``) and the compose API (``kvpolicy.lang.compose``) both
produce a :class:`Policy`; the formatter prints one; the compiler consumes one.
Nothing here knows about Lark or about tensors.

Conventions (README § The policy language; the papers' notation):

* A *budget* ``B`` counts tokens per KV head per layer and *includes* the
  protected tokens (sinks and the recent window). For non-uniform layer
  schedules ``B`` is the mean over layers.
* Scores are per token and per KV head; attention-based terms are computed per
  query head and reduced to KV heads by GQA aggregation (group of query head
  ``h`` is ``h // n_rep``).
* Equality is structural: ``parse(format(p)) == p``. Source locations never
  take part in equality.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal, Union

BudgetUnit = Literal["tokens", "percent"]
PoolKind = Literal["avg", "max"]
GqaReduce = Literal["mean", "max"]
GlobalNorm = Literal["sum", "mean", "uniform"]
NormalizeKind = Literal["mean_align", "max_align", "zscore", "rank"]
SelectionUnit = Literal["head", "layer", "pooled"]
MergeTarget = Literal["keys", "values", "kv"]
MergeMetric = Literal["cosine", "dot", "l2"]
MergeWeight = Literal["score", "uniform"]
EvictInto = Literal["drop", "zero_class"]

POOL_KINDS = ("avg", "max")
GQA_REDUCES = ("mean", "max")
GLOBAL_NORMS = ("sum", "mean", "uniform")
NORMALIZE_KINDS = ("mean_align", "max_align", "zscore", "rank")
MERGE_TARGETS = ("keys", "values", "kv")
MERGE_METRICS = ("cosine", "dot", "l2")
MERGE_WEIGHTS = ("score", "uniform")


# --------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class Budget:
    """How many tokens each KV head of a layer keeps.

    ``unit="tokens"``: ``amount`` tokens per KV head per layer (an integer).
    ``unit="percent"``: ``amount`` percent of the prompt (0 < amount <= 100),
    then clipped to ``[floor, cap]`` tokens when those are given.
    A budget at or above the prompt length keeps the prompt unchanged.
    """

    amount: float
    unit: BudgetUnit = "tokens"
    floor: int | None = None
    cap: int | None = None

    @property
    def is_full(self) -> bool:
        """True when this budget keeps every token whatever the prompt."""
        return self.unit == "percent" and self.amount >= 100

    def tokens_for(self, prompt_len: int) -> int:
        """Tokens per KV head for a prompt of ``prompt_len`` tokens (never above it)."""
        return max(0, min(self.unclipped(prompt_len), prompt_len))

    def unclipped(self, prompt_len: int) -> int:
        """:meth:`tokens_for` before it is clipped to the prompt: what a
        decode-time trigger holds a request to once its generation is longer."""
        if self.unit == "tokens":
            n = int(self.amount)
        else:
            n = int(round(self.amount / 100.0 * prompt_len))
            if self.floor is not None:
                n = max(n, self.floor)
            if self.cap is not None:
                n = min(n, self.cap)
        return max(0, n)


@dataclass(frozen=True)
class Protect:
    """Tokens always kept and never scored: the first ``sink`` tokens (attention
    sinks, Xiao et al. 2023) and the last ``recent`` prompt tokens. They count
    inside the budget."""

    sink: int = 0
    recent: int = 0

    @property
    def total(self) -> int:
        return self.sink + self.recent


# --------------------------------------------------------------------------- score expressions


class ScoreExpr:
    """Base of score expressions. Arithmetic builds IR (composition is data)."""

    __slots__ = ()

    def __add__(self, other: "ScoreExpr") -> "WeightedSum":
        return WeightedSum(_terms(self) + _terms(_as_expr(other)))

    def __radd__(self, other: "ScoreExpr") -> "WeightedSum":
        return WeightedSum(_terms(_as_expr(other)) + _terms(self))

    def __sub__(self, other: "ScoreExpr") -> "WeightedSum":
        return self + (-_as_expr(other))

    def __neg__(self) -> "WeightedSum":
        return self * -1.0

    def __mul__(self, weight: float) -> "WeightedSum":
        if isinstance(weight, ScoreExpr) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError("scores combine by weighted sums; multiply a score by a number")
        # a weighted sum scales term by term, so 2 * (a + b) is 2 * a + 2 * b
        return WeightedSum(tuple((float(weight) * w, t) for w, t in _terms(self)))

    __rmul__ = __mul__


def _as_expr(x) -> "ScoreExpr":
    if isinstance(x, str):
        return ScoreRef(x)
    if not isinstance(x, ScoreExpr):
        raise TypeError(f"expected a score expression or a score name, got {x!r}")
    return x


def _terms(e: "ScoreExpr") -> tuple[tuple[float, "ScoreExpr"], ...]:
    return e.terms if isinstance(e, WeightedSum) else ((1.0, e),)


@dataclass(frozen=True)
class AllHeads:
    """Every query head of the layer scores (the default)."""


@dataclass(frozen=True)
class RetrievalHeads:
    """Only a layer's top ``top`` semantic retrieval heads score (CompressKV,
    arXiv 2508.02401 §3.1). ``artifact`` names the calibration JSON written by
    ``kvpolicy calibrate heads``; ``None`` means the served model's own artifact,
    resolved when the policy is compiled for a model."""

    top: int = 4
    artifact: str | None = None


Heads = Union[AllHeads, RetrievalHeads]


@dataclass(frozen=True)
class Pool:
    """1-D pooling of scores along the token axis, stride 1, same-size output
    (SnapKV, arXiv 2404.14469 §4.2: kernel 5-7). Zero padding is counted for
    ``avg`` (``count_include_pad``), as in SnapKV and CompressKV."""

    kind: PoolKind
    size: int


@dataclass(frozen=True)
class GlobalAttention(ScoreExpr):
    """Accumulated attention each key receives from all prompt queries.

    ``s[j] = sum_i A[i, j]`` over prompt queries ``i >= j`` (H2O, arXiv
    2306.14048, "heavy hitters"). ``norm="mean"`` divides by the number of
    queries that can see key ``j`` (``T - j``), removing the causal bias that
    makes early tokens collect more (EMS, arXiv 2412.08521, global score; the
    exact normalisation is our reading). ``norm="uniform"`` divides instead by
    what key ``j`` would collect if every query spread its attention evenly
    over the keys it can see, ``sum_{i >= j} 1 / (i + 1)``: the ratio of
    observed to causally expected attention (a second reading of the same
    correction). Computed block by block; never an N x N matrix.
    """

    norm: GlobalNorm = "sum"
    heads: Heads = AllHeads()
    gqa: GqaReduce = "mean"


@dataclass(frozen=True)
class LocalAttention(ScoreExpr):
    """Attention of the last ``window`` prompt queries (the observation window).

    ``s[j] = sum_{q in window} softmax(Q_q K^T / sqrt(d))[j]`` in fp32, causal
    inside the window, then pooled (SnapKV, arXiv 2404.14469 eq. 1-2). With
    ``heads=RetrievalHeads`` only those query heads vote (CompressKV).
    """

    window: int
    pool: Pool | None = None
    heads: Heads = AllHeads()
    gqa: GqaReduce = "mean"


@dataclass(frozen=True)
class KeyNorm(ScoreExpr):
    """L2 norm of each key (after RoPE). Knorm (Devoto et al., arXiv 2406.11430)
    keeps *low*-norm keys: write ``-key_norm()``."""


@dataclass(frozen=True)
class ValueNorm(ScoreExpr):
    """L2 norm of each value vector."""


@dataclass(frozen=True)
class Redundancy(ScoreExpr):
    """How redundant each key is with the others of its head (R-KV, Cai et
    al., arXiv 2505.24133, § 3.2): ``r[j] = softmax_j(mean_i S[j, i])`` over
    the tokens, with ``S`` the cosine similarity of key ``j`` to key ``i``,
    ``S[j, j] = 0``, and ``S[j, i*] = 0`` for the most recent ``i*`` with
    ``S[j, i*] > threshold`` (that copy is the one kept). High is redundant:
    R-KV subtracts it from importance, ``λ·local − (1 − λ)·redundancy()``."""

    threshold: float = 0.5


@dataclass(frozen=True)
class Recency(ScoreExpr):
    """The token's position ``j`` (later is higher): top-k by recency is the
    StreamingLLM recent window (Xiao et al., arXiv 2309.17453)."""


@dataclass(frozen=True)
class ScoreRef(ScoreExpr):
    """A reference to an earlier ``score NAME = ...`` definition."""

    name: str


@dataclass(frozen=True)
class WeightedSum(ScoreExpr):
    """``sum_i w_i * e_i``: scores compose linearly, weights are plain floats."""

    terms: tuple[tuple[float, ScoreExpr], ...]


@dataclass(frozen=True)
class Normalize(ScoreExpr):
    """Normalise terms per head before combining them.

    * ``mean_align(a, b, ...)``: rescale each term to the first term's mean
      over the scored tokens, then add (EMS's global-local combination; the
      exact rule is our reading, see ``policies/ems.kvp``).
    * ``max_align(a, b, ...)``: rescale the same way, then take the largest
      per token: a token is kept when either score ranks it high (the
      ``s_Glo-Loc = max(...)`` of EMS's public reviews).
    * ``zscore(a)``: ``(a - mean) / std`` per head.
    * ``rank(a)``: the token's rank within its head, scaled to [0, 1].
    """

    kind: NormalizeKind
    args: tuple[ScoreExpr, ...]


def children(e: ScoreExpr) -> tuple[ScoreExpr, ...]:
    """The sub-expressions of a combining node (none for a term or a reference)."""
    if isinstance(e, WeightedSum):
        return tuple(t for _, t in e.terms)
    if isinstance(e, Normalize):
        return e.args
    return ()


def walk(e: ScoreExpr):
    """Every node of ``e``, pre-order (a node before its children, children in order)."""
    yield e
    for c in children(e):
        yield from walk(c)


def map_terms(e: ScoreExpr, fn) -> ScoreExpr:
    """``e`` rebuilt with ``fn`` applied to every leaf (terms and references);
    the combining nodes keep their shape."""
    if isinstance(e, WeightedSum):
        return WeightedSum(tuple((w, map_terms(t, fn)) for w, t in e.terms))
    if isinstance(e, Normalize):
        return Normalize(e.kind, tuple(map_terms(a, fn) for a in e.args))
    return fn(e)


@dataclass(frozen=True)
class ScoreDef:
    """``score NAME = EXPR``."""

    name: str
    expr: ScoreExpr


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class KeepTop:
    """Keep the tokens with the highest ``score`` up to the budget; with ``p``,
    stop earlier once the kept tokens hold ``p`` of the head's score mass
    (top-p), never exceeding the budget."""

    score: str
    p: float | None = None


@dataclass(frozen=True)
class MergeSimilar:
    """Fold each not-kept token whose ``target`` vector is similar enough to a
    kept one (its class centre) into that centre: ``metric > threshold`` for
    ``cosine``/``dot``, ``l2 < threshold``. ``target="kv"`` measures
    redundancy as EMS's public reviews describe it, the product of key and
    value similarity ``cos(k_n, k_c) * cos(v_n, v_c)`` (cosine only). The centre becomes the weighted
    average of its members' K and V; ``weight="score"`` weights by importance
    score, ``"uniform"`` equally (EMS, arXiv 2412.08521, evict-then-merge).
    With ``cover=q`` only the not-kept tokens needed to bring the head's kept
    score mass up to ``q`` of its total may merge (a sparse head evicts its
    tail instead); see :mod:`kvpolicy.exec.reference.merge`."""

    target: MergeTarget = "keys"
    metric: MergeMetric = "cosine"
    threshold: float = 0.9
    weight: MergeWeight = "score"
    cover: float | None = None

    @property
    def op(self) -> str:
        return "<" if self.metric == "l2" else ">"


@dataclass(frozen=True)
class Evict:
    """What happens to the rest: ``drop`` removes them; ``zero_class`` folds them
    into a dummy class 0 with weight 0 that is dropped after one fixed-shape
    scatter, so every head runs the same kernel whatever its merge/evict split
    (EMS's zero-class mechanism)."""

    into: EvictInto = "drop"


@dataclass(frozen=True)
class Selection:
    """Which tokens survive, decided per ``unit``:

    * ``head``: each KV head picks its own tokens (SnapKV);
    * ``layer``: one choice shared by every KV head of the layer (CompressKV);
    * ``pooled``: the scores of all KV heads of a layer compete for
      ``H_kv * c`` slots, each head keeping at least ``floor(safeguard * c)``
      (AdaKV, arXiv 2407.11550, with safeguard alpha).
    """

    unit: SelectionUnit
    keep: KeepTop
    merge: MergeSimilar | None = None
    evict: Evict = Evict()
    safeguard: float | None = None


# --------------------------------------------------------------------------- layers, trigger


@dataclass(frozen=True)
class Uniform:
    """Every layer gets the budget."""


@dataclass(frozen=True)
class Pyramid:
    """Budgets decreasing linearly with depth (PyramidKV, arXiv 2406.02069):
    with ``c = B - w``, ``min = c // beta``, ``max = 2c - min``,
    ``step = (max - min) // (L - 1)``, ``B_l = max - l * step + w``."""

    beta: float = 20.0


@dataclass(frozen=True)
class Explicit:
    """A per-layer shape, scaled so that its mean equals the budget (exact
    tokens when the list's mean already equals it)."""

    weights: tuple[int, ...]


@dataclass(frozen=True)
class Adaptive:
    """Budgets from measured per-layer eviction error (CompressKV, arXiv
    2508.02401 §3.3): ``B_l = clip(m + round(share_l * (L*B - m*L)), m, 3B)``,
    then +-1 steps until the sum is ``L*B``. ``artifact`` names the JSON of
    ``kvpolicy calibrate layers``; ``None`` means the model's own."""

    artifact: str | None = None


LayerSchedule = Union[Uniform, Pyramid, Explicit, Adaptive]


@dataclass(frozen=True)
class LayerOverride:
    """``layer 0-1 budget 100%``: these layers use their own budget."""

    layers: tuple[int, ...]
    budget: Budget


@dataclass(frozen=True)
class Trigger:
    """When compression runs: after prefill, and/or every ``decode_every``
    decoded tokens once the cache is over budget."""

    prefill: bool = True
    decode_every: int | None = None


def group_overrides(overrides) -> tuple[LayerOverride, ...]:
    """The canonical form of a set of overrides: one entry per distinct budget,
    layers sorted, entries ordered by their first layer (what the parser makes
    of ``layer`` lines, so formatting and parsing round-trip)."""
    by_budget: dict[Budget, list[int]] = {}
    for ov in overrides:
        by_budget.setdefault(ov.budget, []).extend(ov.layers)
    groups = [LayerOverride(tuple(sorted(layers)), b) for b, layers in by_budget.items()]
    return tuple(sorted(groups, key=lambda g: g.layers))


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True, eq=False)
class Policy:
    """A whole policy, as data. Users hold :class:`kvpolicy.lang.combinators.Policy`
    (this, plus the combinators and printing) from :func:`kvpolicy.load` and
    :mod:`kvpolicy.lang.compose`; the parser and the wire format give this class.
    Equality and hashing are by the fields, whichever of the two classes."""

    name: str
    budget: Budget
    description: str = ""
    protect: Protect = Protect()
    scores: tuple[ScoreDef, ...] = ()
    selection: Selection | None = None
    layers: LayerSchedule = Uniform()
    overrides: tuple[LayerOverride, ...] = ()
    trigger: Trigger = Trigger()
    source: str | None = field(default=None, compare=False, repr=False)

    def score(self, name: str) -> ScoreExpr:
        for d in self.scores:
            if d.name == name:
                return d.expr
        raise KeyError(name)

    def _key(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if f.compare)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Policy):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())
