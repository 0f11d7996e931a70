"""The capture buffer: what each prefill forward leaves for the compression
of the requests in it -- the last ``W`` post-RoPE queries per layer and, for
``global()``, the accumulated attention (step 1 of ``runtime``'s docstring).

Two ways in, per layer of a prefill forward (each chunk of a chunked prefill):

* **One pass** (:meth:`CaptureBuffer.extend`, SGLang's ``torch_native``
  backend): for the rows of requests whose policy scores with ``global()``
  the layer's attention is computed here instead of by SGLang, with one
  ``QK^T``, one softmax and one ``PV`` giving both the output and the
  accumulated attention
  (:func:`kvpolicy.exec.reference.attention.attention_with_column_sums`).
  The output equals SGLang's SDPA to fp32 rounding; the batch's other rows
  run through SGLang's own per-row attention.
* **After the layer** (:meth:`CaptureBuffer.on_attention`, every other
  backend, or a layer the one pass does not take): the layer's keys are read
  back from the pool and the chunk's share of the accumulated attention is
  computed from its queries (Triton on CUDA, the reference elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpolicy.exec.pipeline import Pipeline, backend_for
from kvpolicy.lang import ir
from kvpolicy.sglang_ext.pool import read_prompt, request_slots


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
    one_pass_layers: int = 0  # layer-chunks whose global() came from the one attention pass (CaptureBuffer.extend)


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
        self.one_pass_layers: set[int] = set()  # layers of the current forward captured by :meth:`extend`
        self.needs_global = False  # a row of the current forward scores with global()

    def __len__(self) -> int:
        return len(self.captures)

    def get(self, rid: str) -> Capture | None:
        return self.captures.get(rid)

    def pop(self, rid: str) -> Capture | None:
        return self.captures.pop(rid, None)

    def end_forward(self) -> None:
        self.rows, self.key = None, None
        self.one_pass_layers = set()

    def add(self, cap: Capture) -> None:
        self.captures[cap.rid] = cap

    def set_rows(self, rows: list[Capture | None], forward_batch) -> None:
        """The rows of a prefill forward (``None`` where nothing is captured)."""
        self.rows, self.key = (rows, forward_key(forward_batch)) if any(c is not None for c in rows) else (None, None)
        self.one_pass_layers = set()
        self.needs_global = any(c is not None and c.pipeline.needs_accumulated for c in rows)

    def takes(self, backend, layer, forward_batch) -> bool:
        """Whether :meth:`extend` computes this layer of this forward: a row
        needs ``global()`` and the layer is one SGLang's ``torch_native``
        backend runs as plain causal SDPA (no encoder, cross attention or
        sliding window; equal key and value head sizes)."""
        if not self.needs_global or self.rows is None or forward_key(forward_batch) != self.key:
            return False
        return (not layer.is_cross_attention and getattr(layer.attn_type, "name", "DECODER") == "DECODER"
                and (layer.sliding_window_size is None or layer.sliding_window_size < 0)
                and forward_batch.encoder_lens is None and layer.qk_head_dim == layer.v_head_dim
                and getattr(backend, "swa_out_cache_loc", None) is None)

    def extend(self, backend, q: torch.Tensor, k, v, layer, forward_batch, save_kv_cache: bool) -> torch.Tensor:
        """``TorchNativeAttnBackend.forward_extend`` for a forward :meth:`takes`:
        the layer's KV written to the pool as SGLang writes it, then per row
        either one pass with the capture (rows whose policy needs
        ``global()``) or SGLang's own per-row attention (consecutive other
        rows in one call)."""
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc

        kv_pool = backend.token_to_kv_pool
        if save_kv_cache and k is not None and v is not None:
            kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        lid, H, d = layer.layer_id, layer.tp_q_head_num, layer.qk_head_dim
        q_ = q.view(-1, H, d)
        o = torch.empty_like(q)
        o_ = o.view(-1, H, d)
        keys_all, values_all = kv_pool.get_key_buffer(lid), kv_pool.get_value_buffer(lid)
        req_to_token = backend.req_to_token_pool.req_to_token
        ext = forward_batch.extend_seq_lens_cpu
        pre = forward_batch.extend_prefix_lens_cpu
        n_rep = H // layer.tp_k_head_num
        starts = [0]
        for n in ext:
            starts.append(starts[-1] + int(n))
        theirs = []  # a run of rows SGLang computes

        def flush():
            if theirs:
                a, b = theirs[0], theirs[-1] + 1
                backend._run_sdpa_forward_extend(
                    q_[starts[a]:starts[b]], o_[starts[a]:starts[b]], keys_all, values_all, req_to_token,
                    forward_batch.req_pool_indices[a:b], forward_batch.seq_lens[a:b],
                    forward_batch.extend_prefix_lens[a:b], forward_batch.extend_seq_lens[a:b], None,
                    scaling=layer.scaling, enable_gqa=n_rep > 1, causal=True)
                theirs.clear()

        for i, cap in enumerate(self.rows):
            queries = q_[starts[i]:starts[i + 1]].transpose(0, 1)
            if cap is None or not cap.pipeline.needs_accumulated:
                theirs.append(i)
                if cap is not None:  # window queries only
                    _capture(cap, lid, queries, int(pre[i]), None)
                continue
            flush()
            n_pre = int(pre[i])
            slots = request_slots(backend.req_to_token_pool, forward_batch.req_pool_indices[i], 0, n_pre + int(ext[i]))
            keys, values = read_prompt(kv_pool, lid, slots)
            out, share = backend_for(q.device).attention_with_column_sums(queries, keys, values, n_rep,
                                                                          scale=layer.scaling)
            o_[starts[i]:starts[i + 1]] = out.transpose(0, 1).to(o.dtype)
            _capture(cap, lid, queries, n_pre, share)
            cap.one_pass_layers += 1
        flush()
        self.one_pass_layers.add(lid)
        return o

    def on_attention(self, layer, q: torch.Tensor, forward_batch, pools) -> None:
        """After layer ``layer.layer_id`` of a prefill forward wrote its KV;
        ``pools`` = (req_to_token_pool, token_to_kv_pool)."""
        if self.rows is None or forward_key(forward_batch) != self.key or layer.layer_id in self.one_pass_layers:
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
                queries = q[start:start + n_ext].transpose(0, 1)
                share = None
                if cap.pipeline.needs_accumulated:
                    req_to_token_pool, kv_pool = pools
                    slots = request_slots(req_to_token_pool, forward_batch.req_pool_indices[i], 0, n_pre + n_ext)
                    keys = kv_pool.get_key_buffer(lid)[slots].transpose(0, 1)
                    share = backend_for(q.device).accumulated_attention(
                        queries, keys, layer.tp_q_head_num // layer.tp_k_head_num)
                _capture(cap, lid, queries, n_pre, share)
            start += n_ext


def _capture(cap: Capture, lid: int, q: torch.Tensor, n_pre: int, share: torch.Tensor | None) -> None:
    """Keep layer ``lid``'s last window queries (``q [H, T, d]``, the chunk's,
    at positions ``n_pre ..``) and add the chunk's share ``[H, n_pre + T]`` of
    the accumulated attention."""
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
    if share is not None:
        if cap.accumulated[lid] is None:
            cap.accumulated[lid] = torch.zeros(q.shape[0], cap.prompt_len, dtype=torch.float32, device=q.device)
        cap.accumulated[lid][:, :share.shape[1]] += share
