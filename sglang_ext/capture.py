"""The capture buffer: what each prefill forward leaves for the compression
of the requests in it -- the last ``W`` post-RoPE queries per layer and, for
``global()``, the accumulated attention (step 1 of ``runtime``'s docstring).

Every prefill forward (each chunk of a chunked prefill) calls
:meth:`CaptureBuffer.on_attention` once per layer, after the layer wrote its
keys and values to the pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpolicy.exec.pipeline import Pipeline
from kvpolicy.exec.reference.attention import accumulated_attention
from kvpolicy.lang import ir
from kvpolicy.sglang_ext.pool import request_slots


@dataclass
class Capture:
    """What one request's prefill leaves for its compression."""

    rid: str
    prompt_len: int
    pipeline: Pipeline
    policy: ir.Policy
    queries: list = field(default_factory=list)  # per layer [H, <=W, d]
    accumulated: list = field(default_factory=list)  # per layer [H, N] fp32, or None
    first_query: int | None = None  # position of the first query this prefill computed


def forward_key(forward_batch) -> tuple | None:
    """Which prefill forward this is: the model runs a copy of the
    ForwardBatch the scheduler built, so rows are matched by their lengths."""
    if not forward_batch.forward_mode.is_extend() or forward_batch.extend_seq_lens_cpu is None:
        return None
    return (tuple(forward_batch.extend_prefix_lens_cpu), tuple(forward_batch.extend_seq_lens_cpu))


class CaptureBuffer:
    """The captures of requests being prefilled, and which rows of the
    current prefill forward they are."""

    def __init__(self):
        self.captures: dict[str, Capture] = {}
        self.rows: list[Capture | None] | None = None  # the current prefill forward's rows
        self.key: tuple | None = None  # the current prefill forward's key

    def __len__(self) -> int:
        return len(self.captures)

    def get(self, rid: str) -> Capture | None:
        return self.captures.get(rid)

    def pop(self, rid: str) -> Capture | None:
        return self.captures.pop(rid, None)

    def end_forward(self) -> None:
        self.rows, self.key = None, None

    def add(self, cap: Capture) -> None:
        self.captures[cap.rid] = cap

    def set_rows(self, rows: list[Capture | None], forward_batch) -> None:
        """The rows of a prefill forward (``None`` where nothing is captured)."""
        self.rows, self.key = (rows, forward_key(forward_batch)) if any(c is not None for c in rows) else (None, None)

    def on_attention(self, layer, q: torch.Tensor, forward_batch, pools) -> None:
        """After layer ``layer.layer_id`` of a prefill forward wrote its KV;
        ``pools`` = (req_to_token_pool, token_to_kv_pool)."""
        if self.rows is None or forward_key(forward_batch) != self.key:
            return
        lid = layer.layer_id
        H, d = layer.tp_q_head_num, layer.qk_head_dim
        q = q.reshape(-1, H, d)
        ext = forward_batch.extend_seq_lens_cpu
        pre = forward_batch.extend_prefix_lens_cpu
        start = 0
        for i, cap in enumerate(self.rows):
            n_ext, n_pre = int(ext[i]), int(pre[i])
            if cap is not None:
                _capture(cap, lid, layer, q[start:start + n_ext].transpose(0, 1), n_pre,
                         forward_batch.req_pool_indices[i], pools)
            start += n_ext


def _capture(cap: Capture, lid: int, layer, q: torch.Tensor, n_pre: int, row, pools) -> None:
    pipe = cap.pipeline
    while len(cap.queries) <= lid:
        cap.queries.append(None)
        cap.accumulated.append(None)
    if cap.first_query is None:  # chunks arrive in order: the first sets it
        cap.first_query = n_pre
    if pipe.window:
        prev = cap.queries[lid]
        joined = q if prev is None else torch.cat([prev, q], dim=1)
        cap.queries[lid] = joined[:, -pipe.window:].detach().clone()
    if pipe.needs_accumulated:
        seen = n_pre + q.shape[1]
        req_to_token_pool, kv_pool = pools
        keys = kv_pool.get_key_buffer(lid)[request_slots(req_to_token_pool, row, 0, seen)].transpose(0, 1)
        share = accumulated_attention(q, keys, layer.tp_q_head_num // layer.tp_k_head_num)
        if cap.accumulated[lid] is None:
            cap.accumulated[lid] = torch.zeros(q.shape[0], cap.prompt_len, dtype=torch.float32, device=q.device)
        cap.accumulated[lid][:, :seen] += share
