"""Score expressions evaluated on one layer's tensors (pure torch, exact).

Every term ends as ``[H_kv, N]`` fp32: attention terms are computed per query
head, pooled along tokens per query head, then reduced to KV heads (GQA mean or
max over the group ``h // n_rep``, as kvpress and SnapKV do), or, with
retrieval heads, averaged over the layer's voting heads and shared by every KV
head (CompressKV, arXiv 2508.02401 §3.2). Normalisers take their statistics
over the *candidate* tokens only (the ones not protected), per KV head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kvpolicy.exec.reference.attention import window_attention
from kvpolicy.lang import ir

EPS = 1e-12


@dataclass
class LayerInputs:
    """What one layer's compression reads.

    keys, values: ``[H_kv, N, d]`` (keys after RoPE); queries: ``[H, W, d]``, the
    last ``W`` prompt queries (``W`` at least every ``local()`` window);
    accumulated: ``[H, N]`` attention summed over all prompt queries (needed by
    ``global()``; see :func:`~kvpolicy.exec.reference.attention.accumulated_attention`).
    """

    keys: Tensor
    values: Tensor
    queries: Tensor | None = None
    accumulated: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]


@dataclass
class ScoreContext:
    inputs: LayerInputs
    n_rep: int
    candidates: Tensor  # [N] bool: True where a token is scored (not protected)
    # this layer's voting query heads for each retrieval-head set the policy uses
    retrieval_heads: dict[ir.RetrievalHeads, tuple[int, ...]] = field(default_factory=dict)
    window_attention: Callable[..., Tensor] = window_attention  # a backend may supply its own
    window_scores: Callable[..., Tensor] | None = None  # local() over all heads in one call (default: window_scores)
    named: dict[str, Tensor] = field(default_factory=dict)


def pool_tokens(scores: Tensor, pool: ir.Pool | None) -> Tensor:
    """1-D pooling along the last axis, stride 1, same length; ``avg`` counts the
    zero padding (``count_include_pad``), as SnapKV's ``avg_pool1d`` does."""
    if pool is None or pool.size == 1 or scores.shape[-1] == 0:
        return scores
    x = scores.unsqueeze(1)
    pad = pool.size // 2
    if pool.kind == "avg":
        out = F.avg_pool1d(x, pool.size, stride=1, padding=pad, count_include_pad=True)
    else:
        out = F.max_pool1d(F.pad(x, (pad, pad), value=float("-inf")), pool.size, stride=1)
    return out.squeeze(1)


def to_kv_heads(per_query_head: Tensor, term, ctx: ScoreContext) -> Tensor:
    """``[H, N] -> [H_kv, N]`` by the term's head set and GQA reduction."""
    H, N = per_query_head.shape
    H_kv = H // ctx.n_rep
    if isinstance(term.heads, ir.RetrievalHeads):
        if term.heads not in ctx.retrieval_heads:
            raise ValueError("a retrieval-head score needs the layer's retrieval heads (from the heads artifact)")
        voted = per_query_head[list(ctx.retrieval_heads[term.heads])].mean(dim=0)
        return voted.expand(H_kv, N).contiguous()
    grouped = per_query_head.view(H_kv, ctx.n_rep, N)
    return grouped.amax(dim=1) if term.gqa == "max" else grouped.mean(dim=1)


def window_scores(queries: Tensor, keys: Tensor, n_rep: int, window: int | None = None,
                  scale: float | None = None, *, reduce: str = "sum", gqa: str = "mean",
                  pool: ir.Pool | None = None) -> Tensor:
    """``local()`` over all query heads, ``[H_kv, N]`` fp32: the window
    attention summed (``reduce="max"``: max'd) over the window's queries
    (SnapKV, arXiv 2404.14469 eq. 1), pooled along the tokens before the
    window (eq. 2; the window's own tokens keep their raw values), reduced
    over each GQA group. The reference of the Triton ``window_scores``
    kernel, which computes it without the ``[H, w, N]`` probabilities."""
    probs = window_attention(queries, keys, n_rep, window=window, scale=scale)  # [H, w, N]
    raw = probs.sum(dim=1) if reduce == "sum" else probs.amax(dim=1)
    prefix = keys.shape[1] - probs.shape[1]
    pooled = torch.cat([pool_tokens(raw[:, :prefix], pool), raw[:, prefix:]], dim=1)
    grouped = pooled.view(-1, n_rep, pooled.shape[-1])
    return grouped.amax(dim=1) if gqa == "max" else grouped.mean(dim=1)


def local_term(term: ir.LocalAttention, ctx: ScoreContext) -> Tensor:
    """SnapKV score: window attention summed over the window's queries, pooled
    over the tokens before the window (the window's own tokens keep their raw
    sums; they are normally protected). Over all heads, one call of the
    backend's :func:`window_scores` (the Triton kernel on CUDA); retrieval
    heads vote from the window attention's rows."""
    inp = ctx.inputs
    if inp.queries is None:
        raise ValueError("local() needs the window queries")
    N = inp.num_tokens
    w = min(term.window, N)
    if isinstance(term.heads, ir.AllHeads):
        return (ctx.window_scores or window_scores)(inp.queries, inp.keys, ctx.n_rep, window=w, gqa=term.gqa,
                                                    pool=term.pool)
    raw = ctx.window_attention(inp.queries, inp.keys, ctx.n_rep, window=w).sum(dim=1)  # [H, N]
    prefix = N - w
    pooled = torch.cat([pool_tokens(raw[:, :prefix], term.pool), raw[:, prefix:]], dim=1)
    return to_kv_heads(pooled, term, ctx)


def global_term(term: ir.GlobalAttention, ctx: ScoreContext) -> Tensor:
    """H2O accumulated attention; ``norm=mean`` divides key ``j``'s sum by the
    ``N - j`` queries that can see it (EMS's causal-bias correction, our reading)."""
    acc = ctx.inputs.accumulated
    if acc is None:
        raise ValueError("global() needs the accumulated attention")
    acc = acc.float()
    N = acc.shape[1]
    if term.norm == "mean":
        acc = acc / torch.arange(N, 0, -1, device=acc.device, dtype=acc.dtype)
    elif term.norm == "uniform":
        acc = acc / uniform_causal_attention(N, acc.device)
    return to_kv_heads(acc, term, ctx)


def uniform_causal_attention(N: int, device=None) -> Tensor:
    """``[N]``: what key ``j`` collects from queries ``i >= j`` when each
    query spreads its attention evenly over the ``i + 1`` keys it sees,
    ``sum_{i=j}^{N-1} 1 / (i + 1)`` (``global(norm=uniform)``)."""
    inv = 1.0 / torch.arange(1, N + 1, dtype=torch.float64, device=device)
    return inv.flip(0).cumsum(0).flip(0).to(torch.float32)


def redundancy_term(term: ir.Redundancy, keys: Tensor, block: int = 1024) -> Tensor:
    """:class:`~kvpolicy.lang.ir.Redundancy` of ``keys [H_kv, N, d]``, ``[H_kv, N]``
    fp32: R-KV's redundancy (arXiv 2505.24133, § 3.2; its public code's
    ``retain_direction="last"``). Rows of the similarity matrix ``[H_kv, b, N]``
    are built ``block`` at a time, never ``N x N`` at once."""
    k = keys.float()
    k = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    H, N, _ = k.shape
    index = torch.arange(N, device=k.device)
    mean = torch.empty(H, N, dtype=torch.float32, device=k.device)
    for s in range(0, N, block):
        e = min(N, s + block)
        sim = torch.matmul(k[:, s:e], k.transpose(1, 2))  # [H, b, N]
        rows = torch.arange(e - s, device=k.device)
        sim[:, rows, rows + s] = 0.0
        # the most recent similar key of each row is the copy that is kept: not counted
        last = torch.where(sim > term.threshold, index, -1).amax(dim=-1, keepdim=True)  # [H, b, 1]
        kept_copy = sim.gather(-1, last.clamp_min(0)) * (last >= 0)
        mean[:, s:e] = (sim.sum(dim=-1) - kept_copy[..., 0]) / N
    return mean.softmax(dim=-1)


def _masked_stats(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    m = mask.to(x.dtype)
    n = m.sum().clamp_min(1.0)
    mean = (x * m).sum(dim=-1, keepdim=True) / n
    var = (((x - mean) ** 2) * m).sum(dim=-1, keepdim=True) / n
    return mean, var.sqrt()


def normalize(term: ir.Normalize, args: list[Tensor], ctx: ScoreContext) -> Tensor:
    mask = ctx.candidates
    if term.kind in ("mean_align", "max_align"):
        # rescale every term to the first term's mean over the candidates,
        # then add them (mean_align) or take the largest per token (max_align)
        ref, _ = _masked_stats(args[0], mask)
        out = args[0].clone()
        for a in args[1:]:
            mean, _ = _masked_stats(a, mask)
            aligned = a * (ref / mean.where(mean.abs() > EPS, torch.ones_like(mean)))
            out = out + aligned if term.kind == "mean_align" else torch.maximum(out, aligned)
        return out
    (a,) = args
    if term.kind == "zscore":
        mean, std = _masked_stats(a, mask)
        return (a - mean) / std.clamp_min(EPS)
    # rank among the candidates, scaled to [0, 1]; protected tokens rank lowest
    masked = a.masked_fill(~mask, float("-inf"))
    ranks = masked.argsort(dim=-1).argsort(dim=-1).to(torch.float32)
    n_cand = int(mask.sum())
    ranks = ranks - (a.shape[-1] - n_cand)
    return (ranks / max(n_cand - 1, 1)).masked_fill(~mask, 0.0)


def evaluate(expr: ir.ScoreExpr, ctx: ScoreContext) -> Tensor:
    """The value of ``expr`` on this layer, ``[H_kv, N]`` fp32."""
    inp = ctx.inputs
    H_kv, N = inp.keys.shape[0], inp.num_tokens
    if isinstance(expr, ir.ScoreRef):
        return ctx.named[expr.name]
    if isinstance(expr, ir.LocalAttention):
        return local_term(expr, ctx)
    if isinstance(expr, ir.GlobalAttention):
        return global_term(expr, ctx)
    if isinstance(expr, ir.KeyNorm):
        return inp.keys.float().norm(dim=-1)
    if isinstance(expr, ir.ValueNorm):
        return inp.values.float().norm(dim=-1)
    if isinstance(expr, ir.Redundancy):
        return redundancy_term(expr, inp.keys)
    if isinstance(expr, ir.Recency):
        return torch.arange(N, dtype=torch.float32, device=inp.keys.device).expand(H_kv, N).contiguous()
    if isinstance(expr, ir.WeightedSum):
        out = torch.zeros(H_kv, N, dtype=torch.float32, device=inp.keys.device)
        for w, t in expr.terms:
            out = out + w * evaluate(t, ctx)
        return out
    if isinstance(expr, ir.Normalize):
        return normalize(expr, [evaluate(a, ctx) for a in expr.args], ctx)
    raise TypeError(f"not a score expression: {expr!r}")


def evaluate_all(policy: ir.Policy, ctx: ScoreContext) -> dict[str, Tensor]:
    """Every ``score`` of the policy, in order (later ones may refer to earlier)."""
    for d in policy.scores:
        ctx.named[d.name] = evaluate(d.expr, ctx)
    return ctx.named
