"""Policy -> executable per-layer pipeline (ARCHITECTURE.md § Execution).

:func:`compile_pipeline` does the per-request work once (``plan()``): layer
budgets, retrieval heads per layer, the protected set. :meth:`Pipeline.compress`
runs one layer (``run()``): score -> aggregate -> protect -> allocate ->
classify -> merge -> compact, each stage from the pipeline's :class:`Backend`.
The reference backend is pure torch and exact; the Triton backend
(:mod:`kvpolicy.kernels`) provides the same signatures and is picked for CUDA
tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from kvpolicy.compile.compiler import Plan, plan, referenced_terms
from kvpolicy.exec.reference import attention, merge, select
from kvpolicy.exec.reference.scores import LayerInputs, ScoreContext, evaluate_all, window_scores
from kvpolicy.lang import ir
from kvpolicy.lang.budgets import ModelShape, policy_artifact
from kvpolicy.lang.errors import PolicyError


@dataclass(frozen=True)
class Backend:
    """Stage implementations, all with the reference signatures."""

    name: str
    accumulated_attention: Callable[..., Tensor]
    attention_with_column_sums: Callable[..., tuple[Tensor | None, Tensor]]
    window_attention: Callable[..., Tensor]
    window_scores: Callable[..., Tensor]
    pick: Callable[..., select.Picks]
    classify: Callable[..., merge.Classes]
    scatter: Callable[..., tuple[Tensor, Tensor]]


REFERENCE = Backend("reference", attention.accumulated_attention, attention.attention_with_column_sums,
                    attention.window_attention, window_scores,
                    select.pick, merge.classify, merge.scatter)


def triton_backend() -> Backend:
    """The Triton stages (``kvpolicy.kernels``), same signatures as the reference."""
    from kvpolicy.kernels import attention as k_attention
    from kvpolicy.kernels import merge as k_merge
    from kvpolicy.kernels import select as k_select

    return Backend("triton", k_attention.accumulated_attention, k_attention.attention_with_column_sums,
                   k_attention.window_attention, k_attention.window_scores,
                   k_select.pick, k_merge.classify, k_merge.scatter)


def backend_for(device: torch.device) -> Backend:
    """Triton for CUDA tensors when Triton compiles there, the reference
    otherwise (the CPU runs kernels only interpreted, in their tests)."""
    if device.type == "cuda":
        from kvpolicy.kernels import available

        if available(str(device)) == "compiled":
            return triton_backend()
    return REFERENCE


@dataclass
class CompressedLayer:
    """One layer's compressed KV, per KV head.

    keys, values: ``[H_kv, K, d]``; positions: ``[H_kv, K]`` the original
    position of each kept token (its class centre for merged ones), ``-1`` in
    unused slots; counts: ``[H_kv]`` valid slots per head; merged / evicted:
    ``[H_kv]`` tokens folded into centres / dropped.
    """

    keys: Tensor
    values: Tensor
    positions: Tensor
    counts: Tensor
    merged: Tensor
    evicted: Tensor

    @property
    def uniform(self) -> bool:
        return bool((self.counts == self.counts[0]).all())

    def rank_slot(self) -> tuple[Tensor, Tensor]:
        """``[H_kv, B, d]`` keys and values when every head keeps ``B`` tokens:
        slot ``j`` holds each head's ``j``-th kept token (ARCHITECTURE.md § Where compressed KV lives in SGLang)."""
        if not self.uniform:
            raise ValueError(f"heads keep different counts {self.counts.tolist()}: no rank-slot layout")
        return self.keys, self.values

    def head(self, h: int) -> tuple[Tensor, Tensor, Tensor]:
        n = int(self.counts[h])
        return self.keys[h, :n], self.values[h, :n], self.positions[h, :n]


@dataclass
class Pipeline:
    policy: ir.Policy
    plan: Plan
    retrieval: dict[ir.RetrievalHeads, list[tuple[int, ...]]]  # per layer voting query heads
    backend: Backend | None = None  # None: chosen per call by the tensors' device (backend_for)

    @property
    def window(self) -> int:
        """How many trailing prompt queries the capture must keep (0: none)."""
        ws = [t.window for t in referenced_terms(self.policy) if isinstance(t, ir.LocalAttention)]
        return max(ws, default=0)

    @property
    def needs_accumulated(self) -> bool:
        return any(isinstance(t, ir.GlobalAttention) for t in referenced_terms(self.policy))

    def capture(self, queries: Tensor, keys: Tensor, values: Tensor) -> LayerInputs:
        """The inputs of one layer from its full prompt queries ``[H, N, d]``."""
        n_rep = self.plan.shape.group_size
        backend = self.backend or backend_for(keys.device)
        acc = backend.accumulated_attention(queries, keys, n_rep) if self.needs_accumulated else None
        w = min(self.window, queries.shape[1])
        return LayerInputs(keys, values, queries[:, queries.shape[1] - w:] if w else None, acc)

    def compress(self, layer: int, inputs: LayerInputs, budget: int | None = None) -> CompressedLayer:
        """Compress one layer's KV (``[H_kv, N, d]``, ``N`` = the planned prompt
        length). ``budget`` overrides the planned layer budget (decode-time
        compression keeps the prompt's budget while the cache grows)."""
        keys, values = inputs.keys, inputs.values
        H_kv, N, _ = keys.shape
        if budget is None and N != self.plan.prompt_len:
            raise ValueError(f"the pipeline was planned for {self.plan.prompt_len} tokens, got {N}")
        B = self.plan.layer_budgets[layer] if budget is None else max(budget, min(self.policy.protect.total, N))
        device = keys.device
        sel = self.policy.selection
        if sel is None or B >= N:
            pos = torch.arange(N, device=device).expand(H_kv, N).contiguous()
            zeros = torch.zeros(H_kv, dtype=torch.long, device=device)
            return CompressedLayer(keys, values, pos, torch.full((H_kv,), N, device=device), zeros, zeros)
        backend = self.backend or backend_for(device)
        protected = select.protected_mask(N, self.policy.protect, device)
        candidates = ~protected
        ctx = ScoreContext(inputs, self.plan.shape.group_size, candidates,
                           {h: per_layer[layer] for h, per_layer in self.retrieval.items()},
                           backend.window_attention, backend.window_scores)
        score = evaluate_all(self.policy, ctx)[sel.keep.score]
        c = B - int(protected.sum())
        picks = backend.pick(sel, score, candidates, c)
        centres = picks.mask(N)
        kept = centres | protected[None, :]
        classes = backend.classify(keys, values, score, kept, centres, sel.merge, protected)
        k, v = backend.scatter(keys, values, classes)
        return CompressedLayer(k, v, classes.kept_positions, kept.sum(dim=1), classes.merged, classes.evicted)


def compile_pipeline(policy: ir.Policy, shape: ModelShape, prompt_len: int, *,
                     base_dir: Path | None = None, backend: Backend | None = None) -> Pipeline:
    """Plan ``policy`` for a model and prompt length; resolve its artifacts."""
    pl = plan(policy, shape, prompt_len, base_dir=base_dir)
    retrieval = {}
    for t in referenced_terms(policy):
        heads = getattr(t, "heads", None)
        if isinstance(heads, ir.RetrievalHeads) and heads not in retrieval:
            retrieval[heads] = retrieval_heads(policy, heads, shape, base_dir)
    return Pipeline(policy, pl, retrieval, backend)


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
