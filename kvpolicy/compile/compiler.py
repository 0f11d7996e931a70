"""Policy -> per-layer stage plan (ARCHITECTURE.md § Execution).

``capture -> score -> aggregate -> protect -> allocate -> classify -> merge ->
compact``. :func:`plan` resolves everything that depends only on the policy,
the model's shape and the prompt length: which inputs to capture, the scores
in evaluation order, the GQA reduction, the layer and head budgets. It is the
``plan()`` half of the plan/run split: the tensor work of each stage (the
reference executor in torch, then Triton kernels) consumes a :class:`Plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvpolicy.dsl.formatter import expr as format_expr
from kvpolicy.dsl.formatter import layers as format_layers
from kvpolicy.dsl.formatter import selection as format_selection
from kvpolicy.lang import ir
from kvpolicy.lang.budgets import ModelShape, layer_budgets, policy_artifact, pooled_head_floor
from kvpolicy.lang.errors import PolicyError

STAGES = ("capture", "score", "aggregate", "protect", "allocate", "classify", "merge", "compact")


#: The steps the executor runs, each a method of ``Pipeline`` (``kvpolicy.exec.pipeline``),
#: and the step each stage of a plan is carried out by (``None``: before compression,
#: by whoever captures the inputs).
STEP_OF = {"capture": None, "protect": "protect", "score": "score", "aggregate": "score", "allocate": "allocate",
           "classify": "classify", "merge": "classify", "compact": "compact"}


@dataclass(frozen=True)
class Stage:
    """One stage of the per-layer pipeline and what it was configured with."""

    kind: str
    summary: str


@dataclass(frozen=True)
class Plan:
    policy: ir.Policy
    shape: ModelShape
    prompt_len: int
    budget: int  # B: tokens per KV head per layer (mean), resolved
    layer_budgets: tuple[int, ...]
    stages: tuple[Stage, ...]
    # per retrieval-head set the policy uses, each layer's voting query heads (the artifact, read at compile time)
    retrieval: tuple[tuple[ir.RetrievalHeads, tuple[tuple[int, ...], ...]], ...] = ()

    @property
    def run_order(self) -> tuple[str, ...]:
        """The executor's steps, in the order the plan's stages ask for them."""
        steps = [STEP_OF[st.kind] for st in self.stages if STEP_OF[st.kind] is not None]
        return tuple(dict.fromkeys(steps))

    @property
    def window(self) -> int:
        """How many trailing prompt queries the capture must keep (0: none)."""
        return max((t.window for t in referenced_terms(self.policy) if isinstance(t, ir.LocalAttention)), default=0)

    @property
    def needs_accumulated(self) -> bool:
        """Whether the capture must accumulate attention over every prompt query (``global()``)."""
        return any(isinstance(t, ir.GlobalAttention) for t in referenced_terms(self.policy))

    def retrieval_heads(self, layer: int) -> dict[ir.RetrievalHeads, tuple[int, ...]]:
        return {heads: per_layer[layer] for heads, per_layer in self.retrieval}

    @property
    def compresses(self) -> bool:
        return any(b < self.prompt_len for b in self.layer_budgets)

    @property
    def decode_budgets(self) -> tuple[int, ...]:
        """What a decode-time trigger compresses each layer back to: its
        budget, unclipped where the prompt was shorter than it (a prompt
        under the budget keeps everything at prefill, and is compressed
        once its generation crosses the budget)."""
        full = self.policy.budget.unclipped(self.prompt_len)
        return tuple(max(b, full) if b >= self.prompt_len else b for b in self.layer_budgets)

    @property
    def kept_slots(self) -> int:
        return sum(self.layer_budgets) * self.shape.num_kv_heads

    @property
    def total_slots(self) -> int:
        return self.prompt_len * self.shape.num_layers * self.shape.num_kv_heads

    def head_budgets(self, layer: int) -> str:
        """The per-head budgets of ``layer`` as text (pooled ones are a range)."""
        b = self.layer_budgets[layer]
        sel = self.policy.selection
        if sel is not None and sel.unit == "pooled" and b < self.prompt_len:
            lo = pooled_head_floor(self.policy, b)
            hi = b * self.shape.num_kv_heads - lo * (self.shape.num_kv_heads - 1)
            return f"{lo}..{min(hi, self.prompt_len)} (sum {b * self.shape.num_kv_heads})"
        return " ".join([str(b)] * self.shape.num_kv_heads)


def referenced_terms(policy: ir.Policy) -> list[ir.ScoreExpr]:
    """Score terms (leaves that read the cache) used by any score, in order."""
    out: list[ir.ScoreExpr] = []
    for d in policy.scores:
        for e in ir.walk(d.expr):
            if not isinstance(e, (ir.ScoreRef, ir.WeightedSum, ir.Normalize)) and e not in out:
                out.append(e)
    return out


def decode_trigger_limit(policy: ir.Policy) -> str | None:
    """Why ``policy``'s decode-time trigger (``trigger every N tokens``) cannot
    be run exactly, or ``None`` when it can (or there is none). One answer
    for the transformers path and the server, which both refuse these.

    * ``global()``: the accumulated attention covers the prompt's queries;
      after the first compression the prompt queries' rows over the evicted
      keys are gone, and summing each decode step's attention row over the
      whole cache (H2O's running accumulation) is not implemented, so a
      recompression would rank the kept prompt tokens and the decoded ones
      on different evidence.
    * heads that keep different numbers of tokens (``per head pooled``,
      ``keep top p``): a recompression reads each layer as ``[H_kv, n, d]``,
      one length for every head.
    """
    if policy.trigger.decode_every is None or policy.selection is None:
        return None
    if any(isinstance(t, ir.GlobalAttention) for t in referenced_terms(policy)):
        return ("it scores with global(), whose accumulated attention covers only the prompt's queries "
                "(decode steps' attention is not accumulated)")
    sel = policy.selection
    if sel.unit == "pooled":
        return "its heads keep different numbers of tokens (per head pooled), and a recompression needs one length per layer"
    if sel.keep.p is not None:
        return f"top-p keeping (p={sel.keep.p}) gives heads different numbers of tokens, and a recompression needs one length per layer"
    return None


def plan(policy: ir.Policy, shape: ModelShape, prompt_len: int, *, base_dir: Path | None = None) -> Plan:
    budgets = layer_budgets(policy, shape, prompt_len, base_dir=base_dir)
    B = policy.budget.tokens_for(prompt_len)
    windows = [t.window for t in referenced_terms(policy) if isinstance(t, ir.LocalAttention)]
    for layer, b in enumerate(budgets):
        if windows and b < prompt_len and max(windows) > b:
            raise PolicyError(
                f"at a {prompt_len}-token prompt layer {layer} keeps {b} tokens, fewer than the observation "
                f"window ({max(windows)} queries); raise the budget (or its floor) or shrink the window",
                file=policy.source,
            )
    retrieval = {}
    for t in referenced_terms(policy):
        heads = getattr(t, "heads", None)
        if isinstance(heads, ir.RetrievalHeads) and heads not in retrieval:
            retrieval[heads] = tuple(retrieval_heads(policy, heads, shape, base_dir))
    return Plan(policy, shape, prompt_len, B, budgets, tuple(_stages(policy, shape, prompt_len)),
                tuple(retrieval.items()))


def retrieval_heads(policy: ir.Policy, heads: ir.RetrievalHeads, shape: ModelShape,
                    base_dir: Path | None = None) -> list[tuple[int, ...]]:
    """Per layer, the ``top`` best query heads of the heads artifact."""
    data = policy_artifact(policy, heads.artifact, "retrieval_heads", shape, base_dir)
    if data["num_heads"] != shape.num_q_heads:
        raise PolicyError(f"the heads artifact scores {data['num_heads']} query heads per layer, "
                          f"the model has {shape.num_q_heads}", file=policy.source)
    if heads.top > shape.num_q_heads:
        raise PolicyError(f"retrieval(top={heads.top}) but layers have {shape.num_q_heads} query heads",
                          file=policy.source)
    return [tuple(row[: heads.top]) for row in data["ranked"]]


def _stages(p: ir.Policy, shape: ModelShape, T: int) -> list[Stage]:
    if p.selection is None:
        return [Stage("compact", "none: the full cache is kept")]
    terms = referenced_terms(p)
    needs = []
    windows = sorted({t.window for t in terms if isinstance(t, ir.LocalAttention)})
    if windows:
        needs.append(f"queries of the last {', '.join(map(str, windows))} prompt tokens")
    if any(isinstance(t, ir.GlobalAttention) for t in terms):
        needs.append(f"attention accumulated over all {T} prompt queries, block by block (never {T}x{T})")
    if any(isinstance(t, (ir.KeyNorm, ir.ValueNorm)) for t in terms):
        needs.append("key/value norms")
    if any(isinstance(t, ir.Recency) for t in terms):
        needs.append("token positions")
    if any(isinstance(t, ir.Redundancy) for t in terms):
        needs.append("key-key cosine similarities per head, block by block")
    stages = [Stage("capture", "; ".join(needs) or "nothing beyond the cache")]
    pr = p.protect
    stages.append(Stage("protect", f"sink {pr.sink}, recent {pr.recent}: always kept, counted in the budget; "
                                   "scores and their statistics cover the other tokens"))
    stages.append(Stage("score", "; ".join(f"{d.name} = {format_expr(d.expr)}" for d in p.scores)))

    retrieval = [t.heads for t in terms if isinstance(getattr(t, "heads", None), ir.RetrievalHeads)]
    n = shape.group_size
    gqa = sorted({t.gqa for t in terms if isinstance(t, (ir.GlobalAttention, ir.LocalAttention))})
    agg = f"query heads -> KV heads by {'/'.join(gqa) or 'mean'} over each group of {n} (query head h reads KV head h // {n})"
    if retrieval:
        agg = (f"only each layer's top {retrieval[0].top} retrieval heads vote "
               f"({retrieval[0].artifact or 'the model artifact'}); their mean is shared by every KV head")
    pools = sorted({f"{t.pool.kind}({t.pool.size})" for t in terms if isinstance(t, ir.LocalAttention) and t.pool})
    if pools:
        agg += f"; pool along tokens with {', '.join(pools)}"
    stages.append(Stage("aggregate", agg))

    sel = p.selection
    unit = {
        "head": "each KV head chooses its own tokens",
        "layer": "one choice shared by all KV heads of the layer (scores averaged over heads)",
        "pooled": f"KV heads of a layer compete for H_kv x c slots; each keeps at least w + floor({sel.safeguard} x c)",
    }[sel.unit]
    stages.append(Stage("allocate", f"layers {format_layers(p.layers)}"
                        + (f" with {len(p.overrides)} override(s)" if p.overrides else "") + f"; {unit}"))
    classes = [line.strip() for line in format_selection(sel)[1:-1]]
    stages.append(Stage("classify", "; ".join(classes)))
    if sel.merge is not None:
        m = sel.merge
        stages.append(Stage(
            "merge",
            "each merged token folds into its most similar kept token ("
            + (f"cos(K) * cos(V) {m.op} {m.threshold}); " if m.target == "kv"
               else f"{m.target}, {m.metric} {m.op} {m.threshold}); ")
            + f"centres become {m.weight}-weighted means of K and V"
            + ("; evicted tokens go to zero class 0, dropped after one fixed-shape scatter" if sel.evict.into == "zero_class" else ""),
        ))
    stages.append(Stage("compact", "gather kept K/V into the first B_l slots of each head (rank-slot layout); "
                                   "free the rest; decode positions continue from the prompt length"))
    return stages


def explain(pl: Plan) -> str:
    """A readable account of a plan (``kvpolicy explain``)."""
    p, s = pl.policy, pl.shape
    out = [f"policy {p.name}" + (f"  ({p.source})" if p.source else "")]
    if p.description:
        out.append(f"  {p.description}")
    model = f"{s.name}: " if s.name else ""
    out.append(f"model   {model}{s.num_layers} layers, {s.num_q_heads} query heads, {s.num_kv_heads} KV heads "
               f"(group of {s.group_size})")
    b = p.budget
    given = f"{b.amount:g}% of the prompt" if b.unit == "percent" else f"{int(b.amount)} tokens"
    tokens = f"{pl.budget} token{'s' if pl.budget != 1 else ''}"
    out.append(f"budget  {given} -> B = {tokens} per KV head per layer for a {pl.prompt_len}-token prompt"
               + (f", raised to the {p.protect.total} protected tokens" if pl.budget < min(p.protect.total, pl.prompt_len) else ""))
    t = p.trigger
    when = (["after prefill"] if t.prefill else []) + (
        [f"every {t.decode_every} decoded tokens once over budget"] if t.decode_every else [])
    out.append(f"trigger {'; '.join(when)}")
    out.append("")
    out.append("stages (run per layer):")
    for i, st in enumerate(pl.stages, 1):
        out.append(f"  {i}. {st.kind:<9} {st.summary}")
    if pl.run_order:
        folded = [f"{st.kind} in {STEP_OF[st.kind]}" for st in pl.stages
                  if STEP_OF[st.kind] is not None and STEP_OF[st.kind] != st.kind]
        out.append(f"  run: {' -> '.join(pl.run_order)}" + (f" ({', '.join(folded)})" if folded else ""))
    out.append("")
    out.append("layer budgets (tokens kept per KV head):")
    out.append("  layer  budget  per head")
    for layer, lb in enumerate(pl.layer_budgets):
        out.append(f"  {layer:>5}  {lb:>6}  {pl.head_budgets(layer)}")
    pct = 100.0 * pl.kept_slots / pl.total_slots
    out.append("")
    mean = sum(pl.layer_budgets) / len(pl.layer_budgets)
    out.append(f"kept    {pl.kept_slots} of {pl.total_slots} token slots ({pct:.1f}% of the full cache); "
               f"mean layer budget {mean:.1f} tokens"
               + ("" if pl.compresses else "; nothing is compressed at this prompt length"))
    return "\n".join(out)
