"""Scheduler-side half of ``--kv-policy``: capture during prefill, compress
in SGLang's pool right after it, and keep decode positions logical.

Life of a compressed request (ARCHITECTURE.md § Where compressed KV lives in SGLang):

1. **Capture.** Every prefill forward (each chunk of a chunked prefill)
   keeps, per layer, the last ``W`` post-RoPE queries of each request that
   will be compressed and, when the policy scores with ``global()``, adds
   the chunk's share of the accumulated attention: on the CPU from the same
   attention pass that gives the layer's output, elsewhere after the layer
   from the pool's keys (:mod:`.capture`; ARCHITECTURE.md § Capture in one
   attention pass).
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
import time

import torch

from kvpolicy.exec.pipeline import Pipeline, backend_for, compile_pipeline
from kvpolicy.exec.reference.attention import split_decode_attention
from kvpolicy.exec.reference.scores import LayerInputs
from kvpolicy.lang import ir
from kvpolicy.lang.budgets import ModelShape
from kvpolicy.lang.errors import PolicyError
from kvpolicy.sglang_ext import pool, row_layout
from kvpolicy.sglang_ext.capture import Capture, CaptureBuffer
from kvpolicy.sglang_ext.decode_window import DecodeWindow, DecodeWindows
from kvpolicy.sglang_ext.handoff import request_policy
from kvpolicy.sglang_ext.ledger import Ledger, Record
from kvpolicy.sglang_ext.metrics import metrics
from kvpolicy.sglang_ext.pool import NotCompressed

log = logging.getLogger("kvpolicy")


class Runtime:
    """Per-scheduler coordinator, one per scheduler process, over three parts
    with one job each: the capture buffer (:mod:`.capture`), the pool
    operations (:mod:`.pool`, the only code that touches SGLang's allocator,
    ``req_to_token`` and the radix tree) and the ledger (:mod:`.ledger`:
    records, typed counters, events, invariants)."""

    def __init__(self, policy: ir.Policy):
        self.policy = policy
        self.shape: ModelShape | None = None
        self.pools = None  # (req_to_token_pool, token_to_kv_pool) of the model runner
        self._pipelines: dict[tuple[ir.Policy, int], Pipeline | None] = {}
        self.capture = CaptureBuffer()
        self.windows = DecodeWindows()  # requests whose policy recompresses during decoding
        self.ledger = Ledger()
        # rid -> the row layout and its per-layer readers, for compressed
        # requests whose layers or heads keep different numbers of tokens
        self.layouts: dict[str, tuple[row_layout.RowLayout, list[row_layout.LayerReader]]] = {}
        self.decode_rows: list[tuple] | None = None  # the current decode forward's row-layout requests
        self.scheduler = None  # set before each scheduler step (before_step)
        self.room_made = False  # a compression freed slots since the last step
        self.pool_slots = self.pool_heads = None  # set by attach, with the attention that reads the row layout
        self.split_attention = split_decode_attention
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
        policy keeps every token (no selection, or a budget >= the prompt
        and no decode trigger; :func:`_at_prefill` says whether it compresses
        the prompt itself).
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
        return pipe if min(pipe.plan.layer_budgets) < prompt_len or policy.trigger.decode_every else None

    # -- 1. capture ----------------------------------------------------------------

    def begin_forward(self, batch, forward_batch) -> None:
        """Called as each ForwardBatch is built: note which rows of a prefill
        forward belong to requests that will be compressed."""
        self.capture.end_forward()
        self.decode_rows = None
        self.windows.begin_forward(batch, forward_batch)
        mode = forward_batch.forward_mode
        if mode.is_decode() and self.layouts:
            self.decode_rows = self._decode_rows(batch, forward_batch) or None
        if not mode.is_extend() or mode.is_decode():
            return
        rows = []
        for req in batch.reqs:
            total = len(req.origin_input_ids) + len(req.output_ids)
            cap = self.capture.get(req.rid)
            if cap is None or cap.prompt_len != total:
                policy = self.policy_for(req)
                pipe = self.compresses(policy, total)
                cap = Capture(req.rid, total, pipe, policy) if pipe is not None else None
                if cap is not None:
                    self.capture.add(cap)
                    self.ledger.event(req.rid, "capture", prompt_tokens=total, policy=policy.name)
                else:
                    self.capture.pop(req.rid)
            rows.append(cap)
        self.capture.set_rows(rows, forward_batch)

    def on_attention(self, layer, q: torch.Tensor, forward_batch) -> None:
        """After layer ``layer.layer_id`` of a prefill forward wrote its KV."""
        self.capture.on_attention(layer, q, forward_batch, self.pools)

    # -- 2. compress ---------------------------------------------------------------

    def compress_batch(self, processor, batch) -> None:
        """After a prefill batch's results: compress every request whose
        prompt is now complete and that keeps decoding."""
        self.capture.end_forward()
        for i, req in enumerate(batch.reqs):
            cap = self.capture.get(req.rid)
            if cap is None:
                self._count_exact(req)
                continue
            if req.finished() or req.is_retracted:
                self.release(req, None)
                continue
            if not _prompt_done(batch, i, cap.prompt_len):
                continue  # a middle chunk: more prompt to come
            self.capture.pop(req.rid)
            if not _at_prefill(cap.pipeline, cap.prompt_len):  # a decode trigger only: the prompt stays exact
                self._start_window(req, cap, cap.prompt_len)
                continue
            try:
                rec = self._compress(processor, batch, i, req, cap)
            except NotCompressed as exc:
                self.ledger.totals.requests_not_compressed += 1
                self._left_exact(exc.reason)
                self.ledger.event(req.rid, "not_compressed", reason=str(exc))
                log.warning("kvpolicy: rid=%s not compressed, it keeps its exact KV: %s", req.rid, exc)
            except Exception as exc:  # a bug of ours must not take the server down
                self.ledger.totals.requests_not_compressed += 1
                self._left_exact("error")
                self.ledger.event(req.rid, "not_compressed", reason=repr(exc))
                log.exception("kvpolicy: rid=%s not compressed, it keeps its exact KV", req.rid)
            else:
                if cap.policy.trigger.decode_every:
                    self._start_window(req, cap, rec.slots_kept)
                if self.ledger.check:
                    self.verify(processor.tree_cache)

    def _start_window(self, req, cap: Capture, length: int) -> None:
        w = self.windows.start(req.rid, cap.policy, cap.pipeline, cap.queries, length)
        self.ledger.event(req.rid, "decode_trigger", every=w.every, window=w.window, slots=length,
                          budget=max(cap.pipeline.plan.decode_budgets))

    def before_step(self, scheduler) -> None:
        """Before the scheduler picks its next batch. SGLang stops trying new
        prefills once one did not fit (``running_batch.batch_is_full``) and
        reopens only when a request leaves; a compression makes room without
        any request leaving, so it reopens admission here."""
        self.scheduler = scheduler
        if self.room_made:
            self.room_made = False
            running = getattr(scheduler, "running_batch", None)
            if running is not None:
                running.batch_is_full = False

    def sync_before(self, batch) -> bool:
        """Whether the overlap scheduler must process the last batch's result
        before it launches ``batch``: ``batch`` decodes a request that is still
        being captured, i.e. whose prefill result (and compression) is still
        pending. Its compression then runs (in :meth:`compress_batch`) before
        its first decode step, which the scheduler has already prepared at
        position ``N``: :meth:`_compress` moves that step to ``B``. One step
        of lost overlap per compressing prefill (ARCHITECTURE.md § The
        overlap scheduler)."""
        if len(self.windows) and self.windows.due_before_next() and _results_pending(self.scheduler):
            return True  # a decode-time check on the last result (decode_window's docstring)
        if batch is None or not len(self.capture) or not batch.forward_mode.is_decode():
            return False
        return any(self.capture.get(req.rid) is not None for req in batch.reqs)

    def _running_row(self, req) -> tuple | None:
        """(the scheduler's running batch, the request's row in it) when the
        overlap scheduler merged the request into it before its prefill
        result was processed; ``None`` without overlap (the merge follows)."""
        batch = getattr(self.scheduler, "running_batch", None)
        for j, other in enumerate(getattr(batch, "reqs", None) or ()):
            if other is req:
                return batch, j
        return None

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
        kv = tree.token_to_kv_pool_allocator.get_kvcache()
        N = cap.prompt_len
        running = self._running_row(req)
        # the overlap scheduler may have prepared its first decode step (a slot at position N)
        decode = running is not None and req.kv.kv_allocated_len == N + 1
        held = N + decode
        if req.kv.kv_committed_len != held or req.kv.kv_allocated_len != held:
            raise NotCompressed(f"it holds {req.kv.kv_committed_len} committed / "
                                f"{req.kv.kv_allocated_len} allocated slots, expected the prompt's {N}"
                                + (" and its first decode slot" if decode else ""))
        if len(cap.queries) < self.shape.num_layers:
            raise NotCompressed(f"only {len(cap.queries)} of {self.shape.num_layers} layers were captured")
        W = cap.pipeline.window
        if W and min(q.shape[1] for q in cap.queries) < W:
            raise NotCompressed(f"fewer than {W} window queries were computed")
        old = pool.request_slots(tree.req_to_token_pool, req.kv.req_pool_idx, 0, N).clone()
        queries_seen = N - (cap.first_query or 0)

        # Compress every layer first, then take B slots (pool.install): until
        # the slots are written nothing about the request has changed, so any
        # failure leaves it exact (and is logged), never half-compressed.
        kept, counts = self._compress_layers(
            kv, old, cap.pipeline, lambda lid, k, v: LayerInputs(k, v, cap.queries[lid], cap.accumulated[lid]))
        # Every layer and head keeping B tokens is the rank-slot layout, read by
        # SGLang's own attention; anything else packs into ceil(rows / (L * H_kv))
        # slots and is read through row lists (row_layout).
        done = pool.install(tree, batch, i, req, old, kept, counts, self.pool_slots, running, decode)
        B = done.slots.numel()
        self.room_made = True
        if not done.rank_slot:
            self.layouts[req.rid] = (done.layout, row_layout.readers(done.layout, self.pool_slots, done.slots.device))

        rec = _record(req.rid, cap.policy.name, N, done, N - B, time.perf_counter() - t0, cap.pipeline)
        self.ledger.compressed(req, rec, done.released_own_prompt)
        self.ledger.event(req.rid, "compressed", prompt_tokens=N, slots_kept=B, rows_per_layer=rec.rows_per_layer,
                          layout=rec.layout, output_tokens=len(req.output_ids), first_step_prepared=decode,
                          one_pass_layers=cap.one_pass_layers,
                          room_from_own_prompt=done.released_own_prompt, seconds=round(rec.seconds, 4))
        log.info("kvpolicy: rid=%s policy=%s prompt=%d kept=%d slots (%.1f%%) layout=%s rows/layer=%s freed=%d "
                 "released_to_tree=%d queries=%d/%d in %.2fs (%s)", req.rid, cap.policy.name, N, B, 100.0 * B / N,
                 rec.layout, _span(rec.rows_per_layer), rec.slots_freed, rec.slots_released_to_tree,
                 min(queries_seen, N), N, rec.seconds, rec.backend)
        return rec

    def _compress_layers(self, kv, old: torch.Tensor, pipeline: Pipeline, inputs, budgets=None) -> tuple:
        """Every layer's KV at slots ``old`` read back and compressed:
        ``kept[l] = (keys, values)`` ``[H_kv, K, d]`` with head ``h``'s first
        ``counts[l, h]`` valid, ``counts`` ``[L, H_kv]`` on the CPU.
        ``inputs(l, keys, values)`` builds the layer's inputs; ``budgets``
        overrides the planned layer budgets (a decode-time check)."""
        kept, counts = [], []
        for lid in range(self.shape.num_layers):
            keys, values = pool.read_prompt(kv, lid, old)
            out = pipeline.compress(lid, inputs(lid, keys, values), None if budgets is None else budgets[lid])
            kept.append((out.keys, out.values))
            counts.append(out.counts)
        return kept, torch.stack(counts).cpu()

    # -- 2b. compress again during decoding ------------------------------------------

    def recompress_batch(self, processor, batch) -> None:
        """After a decode batch's results: the decode trigger's check for
        each request that fed its ``N``-th token since the last one, on the
        result of its latest forward (:mod:`.decode_window`)."""
        if not len(self.windows):
            return
        for i, req in enumerate(batch.reqs):
            w = self.windows.get(req.rid)
            if w is None:
                continue
            w.done += 1
            if req.finished() or req.is_retracted or not w.due_now():
                continue
            try:
                self._check(processor, batch, i, req, w)
            except NotCompressed as exc:
                self.ledger.event(req.rid, "not_recompressed", reason=str(exc))
                log.warning("kvpolicy: rid=%s not recompressed, it keeps its KV: %s", req.rid, exc)
            except Exception as exc:  # a bug of ours must not take the server down
                self.ledger.event(req.rid, "not_recompressed", reason=repr(exc))
                log.exception("kvpolicy: rid=%s not recompressed, it keeps its KV", req.rid)
            else:
                if self.ledger.check:
                    self.verify(processor.tree_cache)

    def _check(self, processor, batch, i: int, req, w: DecodeWindow) -> None:
        """One check of the decode trigger: over budget, the request's whole
        private KV (its kept tokens and the ones decoded since; or, never
        compressed yet, its exact prompt too) is compressed to the budget
        again, into fresh slots; the old ones are freed (the prompt's, held
        by the tree, stay there as exact cache)."""
        t0 = time.perf_counter()
        w.checks += 1
        written = w.ran_len
        prepared = req.kv.kv_allocated_len - written  # 1: the overlap scheduler prepared the next step
        w.checked_len = written
        if prepared not in (0, 1) or req.kv.kv_committed_len != req.kv.kv_allocated_len:
            raise NotCompressed(f"it holds {req.kv.kv_committed_len} committed / {req.kv.kv_allocated_len} "
                                f"allocated slots after {written} written")
        w.most_slots = max(w.most_slots, written + prepared)
        budgets = w.pipeline.plan.decode_budgets
        if written <= max(budgets):
            return
        tree = processor.tree_cache
        kv = tree.token_to_kv_pool_allocator.get_kvcache()
        old = pool.request_slots(tree.req_to_token_pool, req.kv.req_pool_idx, 0, written).clone()
        kept, counts = self._compress_layers(kv, old, w.pipeline,
                                             lambda lid, k, v: LayerInputs(k, v, w.queries(lid)), budgets)
        done = pool.install(tree, batch, i, req, old, kept, counts, self.pool_slots, self._running_row(req),
                            bool(prepared))
        B = done.slots.numel()
        w.ran_len = w.checked_len = B
        w.recompressions += 1
        self.room_made = True
        if done.rank_slot:
            self.layouts.pop(req.rid, None)
        else:
            self.layouts[req.rid] = (done.layout, row_layout.readers(done.layout, self.pool_slots, done.slots.device))
        seconds = time.perf_counter() - t0
        before = self.ledger.records.get(req.rid)
        logical = written + (before.position_offset if before is not None else 0)
        # a request first compressed here (its prompt was within budget, or
        # the trigger leaves out prefill) gets its record now
        rec, first = self.ledger.recompressed(
            req, _record(req.rid, w.policy.name, w.pipeline.plan.prompt_len, done, logical - B, seconds, w.pipeline),
            done.released_own_prompt)
        self.ledger.event(req.rid, "recompressed", written=written, held=written + prepared, slots_kept=B,
                          logical=logical, freed=done.slots_freed, released_to_tree=done.slots_released_to_tree,
                          first=first, prepared=bool(prepared), output_tokens=len(req.output_ids),
                          seconds=round(seconds, 4))
        log.info("kvpolicy: rid=%s policy=%s recompressed at %d tokens (%d slots) to %d slots, freed=%d in %.2fs",
                 req.rid, w.policy.name, logical, written, B, done.slots_freed, seconds)

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
        lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens.cpu()
        rows = []
        for i, req in enumerate(batch.reqs):
            entry = self.layouts.get(req.rid)
            if entry is not None:
                layout, readers = entry
                decoded = pool.request_slots(self.pools[0], req.kv.req_pool_idx, layout.slots.numel(), int(lens[i]))
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
        if not self.ledger.records or not forward_batch.forward_mode.is_decode():
            return
        shift = [rec.position_offset if (rec := self.ledger.records.get(req.rid)) else 0 for req in batch.reqs]
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
        self.windows.pop(rid)
        capturing = self.capture.pop(rid) is not None
        record = self.ledger.forget(rid)
        self.layouts.pop(rid, None)
        if record is None and not capturing:
            return None
        finished = req.finished()
        if record is not None and not finished:
            self.ledger.totals.compressed_retracted += 1
        if capturing:
            self.ledger.totals.captures_dropped += 1
        self.ledger.event(rid, "released", finished=finished, compressed=record is not None, capturing=capturing,
                          output_tokens=len(req.output_ids))
        if record is not None and tree is not None and self.ledger.check:
            self.verify(tree)
        return record

    def _invariant_args(self) -> tuple:
        return self.layouts, len(self.capture), self.pool_slots, self.pool_heads, len(self.windows)

    def invariants(self, tree) -> dict:
        """:meth:`kvpolicy.sglang_ext.ledger.Ledger.invariants` of this scheduler."""
        return self.ledger.invariants(tree, *self._invariant_args())

    def verify(self, tree) -> None:
        self.ledger.verify(tree, *self._invariant_args())

    def state(self, allocator, tree) -> dict:
        return self.ledger.state(self.policy.name, allocator, tree, *self._invariant_args())


def _prompt_done(batch, i: int, prompt_len: int) -> bool:
    """Whether row ``i`` of this prefill batch ends the request's prompt. Read
    from the batch itself: with the overlap scheduler a middle chunk's result
    is processed after the next chunk was scheduled, when the request's own
    counters already cover the whole prompt."""
    return int(batch.prefix_lens[i]) + int(batch.extend_lens[i]) >= prompt_len


def _at_prefill(pipe: Pipeline, prompt_len: int) -> bool:
    """Whether the pipeline compresses the prompt when its prefill ends (a
    decode trigger alone captures, but leaves the prompt exact)."""
    return pipe.policy.trigger.prefill and min(pipe.plan.layer_budgets) < prompt_len


def _results_pending(scheduler) -> bool:
    """The overlap scheduler holds a result it has not processed yet."""
    queue = getattr(scheduler, "result_queue", None)
    return queue is None or len(queue) > 0


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


def _record(rid: str, policy: str, prompt_len: int, done, position_offset: int, seconds: float,
            pipeline: Pipeline) -> Record:
    """The ledger's record of one compression installed by ``pool.install`` (``done``)."""
    return Record(rid, policy, prompt_len, done.slots.numel(), done.layout.rows_per_layer,
                  "rank-slot" if done.rank_slot else "rows", done.slots_freed, done.slots_released_to_tree,
                  position_offset, seconds, done.skip_radix_cache_insert,
                  (pipeline.backend or backend_for(done.slots.device)).name)
