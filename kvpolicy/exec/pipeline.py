"""Policy -> executable per-layer pipeline (ARCHITECTURE.md § Execution).

:func:`compile_pipeline` does the per-request work once (``plan()``): layer
budgets, the retrieval heads of each layer (artifacts read there), the
stages and the order of the steps that run them. :meth:`Pipeline.compress`
runs one layer: the plan's ``run_order`` (protect -> score -> allocate ->
classify -> compact; aggregate is part of score, merge of classify), each
step with the pipeline's :class:`Backend`.
The reference backend is pure torch and exact; the Triton backend
(:mod:`kvpolicy.kernels`) provides the same signatures and is picked for CUDA
tensors.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from kvpolicy.compile.compiler import Plan, plan
from kvpolicy.exec.reference import attention, merge, select
from kvpolicy.exec.reference.scores import LayerInputs, ScoreContext, evaluate_all, window_scores
from kvpolicy.lang import ir
from kvpolicy.lang.budgets import ModelShape


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


def cpu_backend() -> Backend:
    """The reference stages with the one attention pass of a prefill compiled
    for the CPU (:mod:`kvpolicy.kernels.cpu`): same signatures, equal to fp32
    rounding."""
    from kvpolicy.kernels import cpu

    return dataclasses.replace(REFERENCE, name="cpu", accumulated_attention=cpu.accumulated_attention,
                               attention_with_column_sums=cpu.attention_with_column_sums)


def backend_for(device: torch.device) -> Backend:
    """Triton for CUDA tensors when Triton compiles there; on the CPU the
    reference with the compiled one pass when it builds here (the CPU runs
    Triton kernels only interpreted, in their tests); the reference otherwise."""
    if device.type == "cuda":
        from kvpolicy.kernels import available

        if available(str(device)) == "compiled":
            return triton_backend()
    elif device.type == "cpu":
        from kvpolicy.kernels import cpu

        if cpu.available() is None:
            return cpu_backend()
        _say_once(f"kvpolicy: {cpu.available()}; the pure-torch one pass is used on the CPU")
    return REFERENCE


_said: set[str] = set()


def _say_once(message: str) -> None:
    """Why a faster backend is not used, once per process, on stderr."""
    if message not in _said and not message.startswith("KVPOLICY_CPU_KERNEL=0"):
        _said.add(message)
        print(message, file=sys.stderr)


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
class LayerRun:
    """One layer's compression while its steps run (:meth:`Pipeline.compress`)."""

    inputs: LayerInputs
    layer: int
    budget: int  # B: tokens kept per KV head, protected ones included
    protected: Tensor | None = None  # [N] bool
    candidates: Tensor | None = None  # [N] bool, scored and selectable
    score: Tensor | None = None  # [H_kv, N] fp32, the selection's score
    kept: Tensor | None = None  # [H_kv, N] bool, centres and protected tokens
    centres: Tensor | None = None  # [H_kv, N] bool, chosen by the score
    classes: merge.Classes | None = None
    out: CompressedLayer | None = None


@dataclass
class Pipeline:
    """A compiled plan and the back end that runs it: :meth:`compress` runs
    the plan's steps (:attr:`kvpolicy.compile.compiler.Plan.run_order`), each a
    method below, on one layer."""

    policy: ir.Policy
    plan: Plan
    backend: Backend | None = None  # None: chosen per call by the tensors' device (backend_for)

    @property
    def window(self) -> int:
        """How many trailing prompt queries the capture must keep (0: none)."""
        return self.plan.window

    @property
    def needs_accumulated(self) -> bool:
        return self.plan.needs_accumulated

    @property
    def retrieval(self) -> dict[ir.RetrievalHeads, tuple[tuple[int, ...], ...]]:
        """Per retrieval-head set, each layer's voting query heads (resolved at compile time)."""
        return dict(self.plan.retrieval)

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
        if self.policy.selection is None or B >= N:
            pos = torch.arange(N, device=device).expand(H_kv, N).contiguous()
            zeros = torch.zeros(H_kv, dtype=torch.long, device=device)
            return CompressedLayer(keys, values, pos, torch.full((H_kv,), N, device=device), zeros, zeros)
        run = LayerRun(inputs, layer, B)
        backend = self.backend or backend_for(device)
        for step in self.plan.run_order:
            getattr(self, f"_{step}")(run, backend)
        return run.out

    # -- the steps, in the plan's order (compiler.STEP_OF) ----------------------------

    def _protect(self, run: LayerRun, backend: Backend) -> None:
        run.protected = select.protected_mask(run.inputs.num_tokens, self.policy.protect, run.inputs.keys.device)
        run.candidates = ~run.protected

    def _score(self, run: LayerRun, backend: Backend) -> None:
        """Every ``score`` of the policy, each term reduced to KV heads (the aggregate stage)."""
        ctx = ScoreContext(run.inputs, self.plan.shape.group_size, run.candidates,
                           self.plan.retrieval_heads(run.layer), backend.window_attention, backend.window_scores)
        run.score = evaluate_all(self.policy, ctx)[self.policy.selection.keep.score]

    def _allocate(self, run: LayerRun, backend: Backend) -> None:
        c = run.budget - int(run.protected.sum())
        picks = backend.pick(self.policy.selection, run.score, run.candidates, c)
        run.centres = picks.mask(run.inputs.num_tokens)
        run.kept = run.centres | run.protected[None, :]

    def _classify(self, run: LayerRun, backend: Backend) -> None:
        """Kept, merged (into their most similar kept token: the merge stage) or evicted."""
        inp = run.inputs
        run.classes = backend.classify(inp.keys, inp.values, run.score, run.kept, run.centres,
                                       self.policy.selection.merge, run.protected)

    def _compact(self, run: LayerRun, backend: Backend) -> None:
        k, v = backend.scatter(run.inputs.keys, run.inputs.values, run.classes)
        run.out = CompressedLayer(k, v, run.classes.kept_positions, run.kept.sum(dim=1), run.classes.merged,
                                  run.classes.evicted)


def compile_pipeline(policy: ir.Policy, shape: ModelShape, prompt_len: int, *,
                     base_dir: Path | None = None, backend: Backend | None = None) -> Pipeline:
    """Plan ``policy`` for a model and prompt length (its artifacts resolved
    there); the pipeline runs that plan on ``backend``."""
    return Pipeline(policy, plan(policy, shape, prompt_len, base_dir=base_dir), backend)
