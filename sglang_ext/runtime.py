"""Scheduler-side half of ``--kv-policy``: capture during prefill, compress
in SGLang's pool right after it, and keep decode positions logical.

Life of a compressed request (ARCHITECTURE.md § Where compressed KV lives in SGLang):

1. **Capture.** Every prefill forward (each chunk of a chunked prefill) runs
   through :func:`on_attention` once per layer, after the layer wrote its
   keys and values to the pool: it keeps the last ``W`` post-RoPE queries of
   each request that will be compressed and, when the policy scores with
   ``global()``, adds the chunk's share of the accumulated attention
   (:func:`kvpolicy.exec.reference.attention.accumulated_attention` with the
   chunk's queries over all keys so far).
2. **Compress.** When the request's prefill result has been processed (its
   prompt is then checkpointed into the radix tree as exact KV),
   :func:`compress_batch` reads each layer's ``N`` keys and values back from
   the pool, runs the policy's pipeline, allocates ``B`` fresh slots, writes
   the rank-slot layout there (slot ``j`` holds every KV head's ``j``-th kept
   token), points ``req_to_token[row, :B]`` at them, and gives up the
   request's hold on the ``N`` uncompressed slots: those the request owned
   are freed; those the tree owns (the prompt it just inserted, or a matched
   prefix) are unlocked and stay in the tree as evictable, exact cache, so
   the next turn of a conversation still matches them. The request's rows in
   the batch now say ``B``; the request is marked ``skip_radix_cache_insert``
   so its private, compressed KV is never inserted into the tree as if it
   were exact, and at finish SGLang's own release frees its ``B + t`` slots.
3. **Decode.** SGLang derives decode positions from the physical length
   (``B + t``); :func:`shift_positions` adds ``N - B`` per request, so RoPE
   sees the logical position ``N + t``.

Choices made here, and why:

* Queries of a prefix matched in the radix tree are not recomputed (that is
  the point of the match). ``local()`` needs only the last ``W`` queries: a
  request that will be compressed never matches more than ``N - W`` tokens
  (:meth:`Runtime.prefix_limit`), so they are always computed. ``global()``
  sums over the queries that were computed: on a radix hit of ``P`` tokens,
  the ``N - P`` new ones. The count is in the request's log line
  (``queries=``), so a hit that shortens the sum is visible, not silent;
  recomputing the prefix would cost the prefill the radix cache saves.
* The policy's pipeline runs on the reference (pure torch) stages; on CUDA
  tensors the Triton stages slot in through the pipeline's backend.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from kvpolicy.exec.pipeline import Pipeline, compile_pipeline
from kvpolicy.exec.reference.attention import accumulated_attention, split_decode_attention
from kvpolicy.exec.reference.scores import LayerInputs
from kvpolicy.lang import ir
from kvpolicy.lang.budgets import ModelShape
from kvpolicy.lang.errors import PolicyError
from kvpolicy.sglang_ext import row_layout
from kvpolicy.sglang_ext.handoff import request_policy
from kvpolicy.sglang_ext.invariants import broken_invariants
from kvpolicy.sglang_ext.metrics import metrics

log = logging.getLogger("kvpolicy")

#: Set in the server's environment to check :meth:`Runtime.invariants` at every
#: compression and every release of a compressed request (the tests do; each
#: check walks the radix tree, so it is off by default).
ENV_CHECK = "KVPOLICY_CHECK_INVARIANTS"
EVENTS_KEPT = 1024  # the last events in ``/server_info``, for tests and the load harness


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


@dataclass
class Record:
    """One compressed request, for its log line and the server's state."""

    rid: str
    policy: str
    prompt_tokens: int
    slots_kept: int  # slots holding its compressed prompt: ceil(rows kept / (layers * KV heads))
    rows_per_layer: list[int]  # tokens kept in each layer, summed over its KV heads
    layout: str  # "rank-slot" (every layer and head keeps slots_kept tokens) or "rows"
    slots_freed: int  # returned to the allocator now
    slots_released_to_tree: int  # still cached by the radix tree, now evictable
    position_offset: int
    seconds: float
    skip_radix_cache_insert: bool  # the request's own flag before compression


class Runtime:
    """Per-scheduler state; one instance per scheduler process."""

    def __init__(self, policy: ir.Policy):
        self.policy = policy
        self.shape: ModelShape | None = None
        self.pools = None  # (req_to_token_pool, token_to_kv_pool) of the model runner
        self._pipelines: dict[tuple[ir.Policy, int], Pipeline | None] = {}
        self.captures: dict[str, Capture] = {}
        self.records: dict[str, Record] = {}  # compressed, still running
        self.rows: list[Capture | None] | None = None  # the current prefill forward's rows
        self.forward_batch: tuple | None = None  # the current prefill forward's key
        self.requests: dict[str, object] = {}  # rid -> SGLang Req, compressed and still running
        # rid -> the row layout and its per-layer readers, for compressed
        # requests whose layers or heads keep different numbers of tokens
        self.layouts: dict[str, tuple[row_layout.RowLayout, list[row_layout.LayerReader]]] = {}
        self.decode_rows: list[tuple] | None = None  # the current decode forward's row-layout requests
        self.pool_slots = self.pool_heads = None  # set by attach, with the attention that reads the row layout
        self.split_attention = split_decode_attention
        self.totals = {"requests_compressed": 0, "prompt_tokens": 0, "slots_kept": 0, "slots_freed": 0,
                       "slots_released_to_tree": 0, "requests_not_compressed": 0,
                       "compressed_retracted": 0, "captures_dropped": 0, "room_from_own_prompt": 0,
                       "invariant_violations": 0}
        # what happened to each request, in order: capture / compressed /
        # not_compressed / released (finished or retracted, compressed or mid-capture)
        self.events: deque[dict] = deque(maxlen=EVENTS_KEPT)
        self.check = os.environ.get(ENV_CHECK, "") not in ("", "0")
        self._refused: set[str] = set()  # rids whose own policy could not be read (logged once)

    # -- setup -----------------------------------------------------------------

    def attach(self, model_runner) -> None:
        """The model's shape and the pools the capture reads keys from."""
        if self.shape is None:
            self.pools = (model_runner.req_to_token_pool, model_runner.token_to_kv_pool)
            hf = model_runner.model_config.hf_text_config
            self.shape = ModelShape(hf.num_hidden_layers, hf.num_key_value_heads or hf.num_attention_heads,
                                    hf.num_attention_heads, name=getattr(hf, "_name_or_path", None))
            # slots per layer buffer (the pool's size plus its padding page) and KV heads per slot
            self.pool_slots, self.pool_heads = model_runner.token_to_kv_pool.get_key_buffer(0).shape[:2]
            self.split_attention = _split_attention_for(model_runner.token_to_kv_pool.get_key_buffer(0).device)

    def policy_for(self, req) -> ir.Policy | None:
        """The server's policy, or the one the request's ``custom_params``
        name (resolved, with a 400 for a bad one, by the HTTP process before
        the request got here: :mod:`kvpolicy.sglang_ext.handoff`); ``None``
        (served exact, logged once) when that resolution is missing."""
        try:
            return request_policy(self.policy, getattr(req.sampling_params, "custom_params", None))
        except PolicyError as exc:
            if req.rid not in self._refused:
                self._refused.add(req.rid)
                log.error("kvpolicy: rid=%s is served exact: %s", req.rid, exc)
            return None

    def compresses(self, policy: ir.Policy | None, prompt_len: int) -> Pipeline | None:
        """The pipeline for a prompt of this length, or ``None`` when the
        policy keeps every token (no selection, or a budget >= the prompt).
        Cached: the scheduler asks (through :meth:`prefix_limit`) for every
        waiting request on every scheduling pass."""
        if policy is None or policy.selection is None or self.shape is None:
            return None
        key = (policy, prompt_len)
        if key not in self._pipelines:
            if len(self._pipelines) >= 4096:
                self._pipelines.clear()
            self._pipelines[key] = self._plan(policy, prompt_len)
        return self._pipelines[key]

    def _plan(self, policy: ir.Policy, prompt_len: int) -> Pipeline | None:
        try:
            pipe = compile_pipeline(policy, self.shape, prompt_len)
        except PolicyError as exc:  # e.g. a budget below the window at this prompt length (logged once: cached)
            log.warning("kvpolicy: a %d-token prompt is not compressed by '%s': %s", prompt_len, policy.name, exc)
            return None
        return pipe if min(pipe.plan.layer_budgets) < prompt_len else None

    # -- 1. capture ----------------------------------------------------------------

    def begin_forward(self, batch, forward_batch) -> None:
        """Called as each ForwardBatch is built: note which rows of a prefill
        forward belong to requests that will be compressed."""
        self.rows, self.forward_batch, self.decode_rows = None, None, None
        mode = forward_batch.forward_mode
        if mode.is_decode() and self.layouts:
            self.decode_rows = self._decode_rows(batch, forward_batch) or None
        if not mode.is_extend() or mode.is_decode():
            return
        rows, any_row = [], False
        for req in batch.reqs:
            total = len(req.origin_input_ids) + len(req.output_ids)
            cap = self.captures.get(req.rid)
            if cap is None or cap.prompt_len != total:
                policy = self.policy_for(req)
                pipe = self.compresses(policy, total)
                cap = Capture(req.rid, total, pipe, policy) if pipe is not None else None
                if cap is not None:
                    self.captures[req.rid] = cap
                    self._event(req.rid, "capture", prompt_tokens=total, policy=policy.name)
                else:
                    self.captures.pop(req.rid, None)
            rows.append(cap)
            any_row |= cap is not None
        if any_row:
            self.rows, self.forward_batch = rows, self._key(forward_batch)

    @staticmethod
    def _key(forward_batch) -> tuple | None:
        """Which prefill forward this is: the model runs a copy of the
        ForwardBatch built here, so rows are matched by their lengths."""
        if not forward_batch.forward_mode.is_extend() or forward_batch.extend_seq_lens_cpu is None:
            return None
        return (tuple(forward_batch.extend_prefix_lens_cpu), tuple(forward_batch.extend_seq_lens_cpu))

    def on_attention(self, layer, q: torch.Tensor, forward_batch) -> None:
        """After layer ``layer.layer_id`` of a prefill forward wrote its KV."""
        if self.rows is None or self._key(forward_batch) != self.forward_batch:
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
                self._capture(cap, lid, layer, q[start:start + n_ext].transpose(0, 1), n_pre, forward_batch, i)
            start += n_ext

    def _capture(self, cap: Capture, lid: int, layer, q: torch.Tensor, n_pre: int, forward_batch, i: int) -> None:
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
            row = forward_batch.req_pool_indices[i]
            req_to_token_pool, kv_pool = self.pools
            slots = req_to_token_pool.req_to_token[row, :seen].long()
            keys = kv_pool.get_key_buffer(lid)[slots].transpose(0, 1)
            share = accumulated_attention(q, keys, layer.tp_q_head_num // layer.tp_k_head_num)
            if cap.accumulated[lid] is None:
                cap.accumulated[lid] = torch.zeros(q.shape[0], cap.prompt_len, dtype=torch.float32,
                                                   device=q.device)
            cap.accumulated[lid][:, :seen] += share

    # -- 2. compress ---------------------------------------------------------------

    def compress_batch(self, processor, batch) -> None:
        """After a prefill batch's results: compress every request whose
        prompt is now complete and that keeps decoding."""
        self.rows, self.forward_batch = None, None
        for i, req in enumerate(batch.reqs):
            cap = self.captures.get(req.rid)
            if cap is None:
                self._count_exact(req)
                continue
            if req.finished() or req.is_retracted:
                self.release(req, None)
                continue
            if req.inflight_middle_chunks > 0 or req.kv.kv_committed_len < cap.prompt_len:
                continue  # a middle chunk: more prompt to come
            del self.captures[req.rid]
            try:
                self._compress(processor, batch, i, req, cap)
            except _NotCompressed as exc:
                self.totals["requests_not_compressed"] += 1
                self._left_exact(exc.reason)
                self._event(req.rid, "not_compressed", reason=str(exc))
                log.warning("kvpolicy: rid=%s not compressed, it keeps its exact KV: %s", req.rid, exc)
            except Exception as exc:  # a bug of ours must not take the server down
                self.totals["requests_not_compressed"] += 1
                self._left_exact("error")
                self._event(req.rid, "not_compressed", reason=repr(exc))
                log.exception("kvpolicy: rid=%s not compressed, it keeps its exact KV", req.rid)
            else:
                if self.check:
                    self.verify(processor.tree_cache)

    def _count_exact(self, req) -> None:
        """A request whose whole prompt was just prefilled without a capture:
        served exact, counted by why (metrics only)."""
        if metrics() is None or req.finished() or req.inflight_middle_chunks > 0 \
                or req.kv.kv_committed_len < len(req.origin_input_ids):
            return
        policy = self.policy_for(req)
        self._left_exact("policy_unreadable" if policy is None else
                         "no_selection" if policy.selection is None else "within_budget")

    @staticmethod
    def _left_exact(reason: str) -> None:
        if (m := metrics()) is not None:
            m.on_left_exact(reason)

    def _compress(self, processor, batch, i: int, req, cap: Capture) -> None:
        t0 = time.perf_counter()
        tree = processor.tree_cache
        allocator = tree.token_to_kv_pool_allocator
        kv = allocator.get_kvcache()
        req_to_token = tree.req_to_token_pool.req_to_token
        row = req.kv.req_pool_idx
        N = cap.prompt_len
        if req.kv.kv_committed_len != N or req.kv.kv_allocated_len != N:
            raise _NotCompressed(f"it holds {req.kv.kv_committed_len} committed / "
                               f"{req.kv.kv_allocated_len} allocated slots, expected the prompt's {N}")
        if len(cap.queries) < self.shape.num_layers:
            raise _NotCompressed(f"only {len(cap.queries)} of {self.shape.num_layers} layers were captured")
        W = cap.pipeline.window
        if W and min(q.shape[1] for q in cap.queries) < W:
            raise _NotCompressed(f"fewer than {W} window queries were computed")
        old = req_to_token[row, :N].to(torch.long).clone()
        queries_seen = N - (cap.first_query or 0)

        # Compress every layer first, then take B slots: until the slots are
        # written nothing about the request has changed, so any failure leaves
        # it exact (and is logged), never half-compressed.
        kept, counts = [], []
        for lid in range(self.shape.num_layers):
            keys = kv.get_key_buffer(lid)[old].transpose(0, 1)
            values = kv.get_value_buffer(lid)[old].transpose(0, 1)
            out = cap.pipeline.compress(lid, LayerInputs(keys, values, cap.queries[lid], cap.accumulated[lid]))
            kept.append((out.keys, out.values))  # [H_kv, K, d], head h's first counts[h] valid
            counts.append(out.counts)
        counts = torch.stack(counts).cpu()  # [L, H_kv]
        # Every layer and head keeping B tokens is the rank-slot layout, read by
        # SGLang's own attention; anything else packs into ceil(rows / (L * H_kv))
        # slots and is read through row lists (row_layout).
        B = row_layout.slots_needed(counts)
        uniform = row_layout.is_rank_slot(counts)
        if not uniform and getattr(kv, "store_dtype", kv.dtype) != kv.dtype:
            raise _NotCompressed(f"the KV cache is stored as {kv.store_dtype}: the row layout needs it unquantised",
                                 "error")
        # Give up the hold on the N uncompressed slots: [0, protected) belong to
        # the tree (unlocked: evictable, still exact cache); the rest were the
        # request's own and go back to the allocator. Normally after the B new
        # slots are written; under memory pressure first, to make room for them.
        protected = req.kv.cache_protected_len
        owned = old[protected:]
        new, released = take_slots(tree, allocator, req, B, owned)
        layout = row_layout.assign(counts, new, self.pool_slots)
        if uniform:
            for lid, (k, v) in enumerate(kept):  # slot j <- every head's j-th kept token
                kv.set_kv_buffer(None, new, k[:, :B].transpose(0, 1).contiguous(), v[:, :B].transpose(0, 1).contiguous(),
                                 layer_id_override=lid)
        else:
            layers = range(self.shape.num_layers)
            row_layout.write([kv.get_key_buffer(i) for i in layers], [kv.get_value_buffer(i) for i in layers],
                             layout, kept)
            self.layouts[req.rid] = (layout, row_layout.readers(layout, self.pool_slots, new.device))
        req_to_token[row, :B] = new.to(req_to_token.dtype)
        if released:
            self.totals["room_from_own_prompt"] += 1
        else:
            release_hold(tree, allocator, req, owned)
        req.kv.cache_protected_len = 0
        req.kv.kv_committed_len = req.kv.kv_allocated_len = B
        skip = req.skip_radix_cache_insert
        req.skip_radix_cache_insert = True
        batch.seq_lens[i] = B
        if batch.seq_lens_cpu is not None:
            batch.seq_lens_cpu[i] = B
        batch.seq_lens_sum = None

        rec = Record(req.rid, cap.policy.name, N, B, layout.rows_per_layer, "rank-slot" if uniform else "rows",
                     int(owned.numel()), protected, N - B, time.perf_counter() - t0, skip)
        self.records[req.rid] = rec
        self.requests[req.rid] = req
        if (m := metrics()) is not None:
            m.on_compressed(rec)
        self._event(req.rid, "compressed", prompt_tokens=N, slots_kept=B, rows_per_layer=rec.rows_per_layer,
                    layout=rec.layout, output_tokens=len(req.output_ids), room_from_own_prompt=released,
                    seconds=round(rec.seconds, 4))
        for key, value in (("requests_compressed", 1), ("prompt_tokens", N), ("slots_kept", B),
                           ("slots_freed", rec.slots_freed), ("slots_released_to_tree", protected)):
            self.totals[key] += value
        log.info("kvpolicy: rid=%s policy=%s prompt=%d kept=%d slots (%.1f%%) layout=%s rows/layer=%s freed=%d "
                 "released_to_tree=%d queries=%d/%d in %.2fs", req.rid, cap.policy.name, N, B, 100.0 * B / N,
                 rec.layout, _span(rec.rows_per_layer), rec.slots_freed, protected, min(queries_seen, N), N,
                 rec.seconds)

    def prefix_limit(self, req, input_len: int, limit: int) -> int:
        """How much of a prompt a radix match may cover: a request that will
        be compressed recomputes at least its last ``W`` tokens, so that the
        observation window's queries exist (``local()``)."""
        if self.shape is None:
            return limit
        pipe = self.compresses(self.policy_for(req), input_len)
        if pipe is None or not pipe.window:
            return limit
        return max(min(limit, input_len - pipe.window), 0)

    # -- 3. decode -----------------------------------------------------------------

    def _decode_rows(self, batch, forward_batch) -> list[tuple]:
        """The decode forward's requests in the row layout: (row in the batch,
        per-layer readers, the slots it decoded into since compression)."""
        table = self.pools[0].req_to_token
        lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens.cpu()
        rows = []
        for i, req in enumerate(batch.reqs):
            entry = self.layouts.get(req.rid)
            if entry is not None:
                layout, readers = entry
                decoded = table[req.kv.req_pool_idx, layout.slots.numel():int(lens[i])].to(torch.long)
                rows.append((i, readers, decoded))
        return rows

    def attend(self, layer, q: torch.Tensor, out, forward_batch):
        """After SGLang's attention of a decode forward: the rows of requests in
        the row layout are recomputed over their own rows (SGLang read their
        ``req_to_token`` as if it were rank-slot; the result is replaced)."""
        if not forward_batch.forward_mode.is_decode() or not isinstance(out, torch.Tensor):
            return out
        kv = self.pools[1]
        lid, H = layer.layer_id, layer.tp_q_head_num
        o = out.view(out.shape[0], H, -1)
        qs = q.reshape(q.shape[0], H, -1)
        for i, readers, decoded in self.decode_rows:
            res = row_layout.decode_attention(qs[i], lid, readers[lid], decoded, kv.get_key_buffer, kv.get_value_buffer,
                                              self.pool_slots, layer.scaling, float(layer.logit_cap or 0.0),
                                              self.split_attention)
            o[i] = res.to(o.dtype)
        return out

    def shift_positions(self, batch, forward_batch) -> None:
        """Decode positions: SGLang's ``seq_len - 1`` plus ``N - B``."""
        if not self.records or not forward_batch.forward_mode.is_decode():
            return
        shift = [rec.position_offset if (rec := self.records.get(req.rid)) else 0 for req in batch.reqs]
        if any(shift):
            pos = forward_batch.positions
            forward_batch.positions = pos + torch.tensor(shift, dtype=pos.dtype, device=pos.device)

    # -- bookkeeping and invariants --------------------------------------------------

    def release(self, req, tree) -> dict | None:
        """The request gave its KV back (SGLang's ``release_kv_cache`` ran, or
        its prefill ended finished): forget its capture or compressed state. A
        request released unfinished was retracted under memory pressure: it
        is prefilled again later, from scratch (prompt and the tokens it had
        generated), and compressed again then; its record is never reused.
        Returns the record it had, if it was compressed."""
        rid = req.rid
        capturing = self.captures.pop(rid, None) is not None
        record = self.records.pop(rid, None)
        self.requests.pop(rid, None)
        self.layouts.pop(rid, None)
        if record is None and not capturing:
            return None
        finished = req.finished()
        if record is not None and not finished:
            self.totals["compressed_retracted"] += 1
        if capturing:
            self.totals["captures_dropped"] += 1
        self._event(rid, "released", finished=finished, compressed=record is not None, capturing=capturing,
                    output_tokens=len(req.output_ids))
        if record is not None and tree is not None and self.check:
            self.verify(tree)
        return record

    def invariants(self, tree) -> dict:
        """What must hold whenever the scheduler is between steps.

        * ``tree_slots == evictable_slots + protected_slots``: the radix
          tree's own accounting covers every slot it holds;
        * ``compressed_slots_in_tree == 0``: no slot of a running compressed
          request (its ``B`` kept tokens and the ones it decoded since) is
          referenced by the tree, so the tree only ever holds exact KV;
        * ``compressed_slots_shared == 0``: no two running compressed
          requests (nor one twice) point at the same slot: each request's
          compressed KV is its own.
          (SGLang's allocator checks, ``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY``
          and ``SGLANG_CHECK_KV_PAGE_INVARIANTS``, cover free + cached + held
          = total, double frees and use after free.)
        """
        tree_slots = tree.total_size() if hasattr(tree, "total_size") else 0  # 0: radix cache off
        if isinstance(tree_slots, tuple):  # the unified radix cache: (full KV, auxiliary state)
            tree_slots = tree_slots[0]
        tree_slots = int(tree_slots)
        compressed = self.compressed_slots(tree.req_to_token_pool)
        in_tree = 0
        if compressed.numel() and tree_slots and hasattr(tree, "all_values_flatten"):
            in_tree = int(torch.isin(compressed, tree.all_values_flatten().to(compressed.device)).sum())
        shared = int(compressed.numel() - torch.unique(compressed).numel())
        rows_shared, rows_outside = self._row_checks(tree.req_to_token_pool)
        return {"tree_slots": tree_slots, "tree_evictable_plus_protected": int(tree.evictable_size())
                + int(tree.protected_size()), "compressed_slots": int(compressed.numel()),
                "compressed_slots_in_tree": in_tree, "compressed_slots_shared": shared,
                "compressed_rows_shared": rows_shared, "compressed_rows_outside_own_slots": rows_outside,
                "captures_pending": len(self.captures)}

    def _row_checks(self, req_to_token_pool) -> tuple[int, int]:
        """Rows of the row layout held twice (by two requests, or one twice),
        and rows outside the slots their request holds for its prompt."""
        if not self.layouts:
            return 0, 0
        S, H = self.pool_slots, self.pool_heads
        table = req_to_token_pool.req_to_token
        all_rows, outside = [], 0
        for rid, (layout, _) in self.layouts.items():  # every entry's request is in self.requests
            rows = torch.cat([t[t >= 0] for t in layout.rows])
            all_rows.append(rows)
            held = table[self.requests[rid].kv.req_pool_idx, :layout.slots.numel()].to(torch.long).cpu()
            outside += int((~torch.isin((rows // H) % S, held)).sum())
        rows = torch.cat(all_rows)
        return int(rows.numel() - rows.unique().numel()), outside

    def compressed_slots(self, req_to_token_pool) -> torch.Tensor:
        """Every slot the running compressed requests hold."""
        table = req_to_token_pool.req_to_token
        parts = [table[req.kv.req_pool_idx, :req.kv.kv_allocated_len].to(torch.long)
                 for req in self.requests.values() if req.kv.req_pool_idx is not None]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def _invariants_or_error(self, tree) -> dict:
        try:
            return self.invariants(tree)
        except Exception as exc:  # reporting must never stop the scheduler
            log.exception("kvpolicy: could not check the invariants")
            return {"error": repr(exc)}

    def verify(self, tree) -> None:
        """:meth:`invariants`, logged as an error and counted if broken."""
        inv = self._invariants_or_error(tree)
        if problems := broken_invariants(inv):
            self.totals["invariant_violations"] += 1
            log.error("kvpolicy: invariant broken: %s (%s)", "; ".join(problems), inv)

    def _event(self, rid: str, event: str, **detail) -> None:
        self.events.append({"rid": rid, "event": event, **detail})

    def state(self, allocator, tree) -> dict:
        return {
            "policy": self.policy.name,
            "available_slots": int(allocator.available_size()),
            "evictable_slots": int(tree.evictable_size()),
            "protected_slots": int(tree.protected_size()),
            "totals": dict(self.totals),
            "running": {rid: vars(r) for rid, r in self.records.items()},
            "invariants": self._invariants_or_error(tree),
            "events": list(self.events),
        }


def _split_attention_for(device: torch.device):
    """The Triton split-decode kernel where it runs compiled, else the torch reference."""
    if device.type == "cuda":
        from kvpolicy import kernels

        if kernels.available("cuda") == "compiled":
            from kvpolicy.kernels.attention import split_decode_attention as kernel

            return kernel
    return split_decode_attention


def _span(values: list[int]) -> str:
    """``[a..b]`` for a per-layer list (all of it when short)."""
    if len(set(values)) == 1:
        return f"{values[0]}x{len(values)}"
    return str(values) if len(values) <= 8 else f"{min(values)}..{max(values)} (sum {sum(values)})"


def release_hold(tree, allocator, req, owned: torch.Tensor) -> None:
    """The request stops holding its uncompressed prompt: the slots it owns
    alone go back to the allocator, its lock on the tree path is released
    (those slots stay cached, now evictable)."""
    if owned.numel():
        allocator.free(owned)
    tree.unlock(req.lock)
    req.lock = None


def take_slots(tree, allocator, req, B: int, owned: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``B`` free slots for a request's compressed copy, and whether its hold
    on the uncompressed prompt was released to find them.

    Free slots and the tree's evictable ones come first. When they fall short
    (a full pool: the prompt the request holds is what fills it), the hold is
    released first, so the ``N > B`` slots it frees or makes evictable make
    room. If even that is not enough, the lock is taken back before anything
    was evicted, and the request keeps its exact KV (:class:`_NotCompressed`).
    Page size 1 (checked at launch): any ``B`` slots will do.
    """
    from sglang.srt.mem_cache.common import evict_from_tree_cache

    released = False
    if allocator.available_size() + tree.evictable_size() < B:
        node = req.lock.node if req.lock is not None else None
        tree.unlock(req.lock)
        req.lock = None
        if allocator.available_size() + tree.evictable_size() + owned.numel() < B:
            if node is not None:
                req.lock = tree.lock(node)
            raise _NotCompressed(f"no room for {B} slots even after releasing its own prompt", "no_room")
        if owned.numel():
            allocator.free(owned)
        released = True
    evict_from_tree_cache(tree, B)
    new = allocator.alloc(B)
    if new is None:  # free + evictable >= B was checked just above
        raise RuntimeError(f"the allocator refused {B} slots with {allocator.available_size()} free")
    return new, released


class _NotCompressed(Exception):
    """The request keeps its exact KV (logged and counted, never silent);
    ``reason`` is its label in :data:`kvpolicy.sglang_ext.metrics.LEFT_EXACT`."""

    def __init__(self, message: str, reason: str = "capture_incomplete"):
        super().__init__(message)
        self.reason = reason
