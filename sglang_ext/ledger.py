"""What the scheduler-side runtime has done, for ``/server_info``, the log, the
metrics and the tests: typed counters, the last events, one record per
running compressed request, and the invariants of the pool and the radix
tree (:meth:`Ledger.invariants`). Reads SGLang's state, never writes it.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import asdict, dataclass

import torch

from kvpolicy.sglang_ext.invariants import broken_invariants
from kvpolicy.sglang_ext.metrics import metrics

log = logging.getLogger("kvpolicy")

#: Set in the server's environment to check :meth:`Ledger.invariants` at every
#: compression and every release of a compressed request (the tests do; each
#: check walks the radix tree, so it is off by default).
ENV_CHECK = "KVPOLICY_CHECK_INVARIANTS"
EVENTS_KEPT = 1024  # the last events in ``/server_info``, for tests and the load harness


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
    seconds: float  # the compression: reading the prompt back, the pipeline, writing the kept tokens
    skip_radix_cache_insert: bool  # the request's own flag before compression
    backend: str = "reference"  # the pipeline's stages: "reference" (torch) or "triton" (CUDA)
    decode_compressions: int = 0  # by the decode trigger (slots_kept, rows_per_layer, position_offset: the last)


@dataclass
class Totals:
    """Counters since the scheduler started (``/server_info``'s ``totals``)."""

    requests_compressed: int = 0
    prompt_tokens: int = 0  # of the compressed requests
    slots_kept: int = 0
    slots_freed: int = 0
    slots_released_to_tree: int = 0
    requests_not_compressed: int = 0  # a capture was made but the request kept its exact KV
    compressed_retracted: int = 0
    captures_dropped: int = 0  # a request released while its prompt was being captured
    room_from_own_prompt: int = 0  # compressions that released their own prompt first to find room
    invariant_violations: int = 0
    compression_seconds: float = 0.0  # summed over the compressed requests
    decode_compressions: int = 0  # by a decode trigger, during decoding
    decode_slots_freed: int = 0  # by those

    def recompressed(self, slots_freed: int, seconds: float) -> None:
        self.decode_compressions += 1
        self.decode_slots_freed += slots_freed
        self.compression_seconds += seconds

    def add(self, record: Record, released_own_prompt: bool) -> None:
        self.requests_compressed += 1
        self.prompt_tokens += record.prompt_tokens
        self.slots_kept += record.slots_kept
        self.slots_freed += record.slots_freed
        self.slots_released_to_tree += record.slots_released_to_tree
        self.room_from_own_prompt += int(released_own_prompt)
        self.compression_seconds += record.seconds


class Ledger:
    """Records, counters, events and invariants of one scheduler."""

    def __init__(self):
        self.totals = Totals()
        self.records: dict[str, Record] = {}  # compressed, still running
        self.requests: dict[str, object] = {}  # rid -> SGLang Req, compressed and still running
        # what happened to each request, in order: capture / compressed /
        # not_compressed / released (finished or retracted, compressed or mid-capture)
        self.events: deque[dict] = deque(maxlen=EVENTS_KEPT)
        self.check = os.environ.get(ENV_CHECK, "") not in ("", "0")

    def event(self, rid: str, event: str, **detail) -> None:
        self.events.append({"rid": rid, "event": event, **detail})

    def compressed(self, req, record: Record, released_own_prompt: bool) -> None:
        """A request compressed for the first time: its record, the totals
        and the Prometheus counters (``--enable-metrics``)."""
        self.records[req.rid] = record
        self.requests[req.rid] = req
        self.totals.add(record, released_own_prompt)
        if (m := metrics()) is not None:
            m.on_compressed(record)

    def recompressed(self, req, fresh: Record, released_own_prompt: bool) -> tuple[Record, bool]:
        """A compression during decoding (a decode trigger's check), which
        ``fresh`` describes alone. A request without a record yet is
        compressed for the first time: ``fresh`` becomes its record. Otherwise
        its record takes the new slots, layout and offset and adds what was
        freed and the seconds. Returns the record and whether it was the first."""
        if (m := metrics()) is not None:
            m.on_recompressed(fresh.policy, fresh.slots_freed, fresh.seconds)
        rec = self.records.get(req.rid)
        if rec is None:
            fresh.decode_compressions = 1
            self.compressed(req, fresh, released_own_prompt)  # its seconds counted there
            self.totals.recompressed(fresh.slots_freed, 0.0)
            return fresh, True
        rec.slots_kept, rec.rows_per_layer, rec.position_offset = (fresh.slots_kept, fresh.rows_per_layer,
                                                                   fresh.position_offset)
        rec.slots_freed += fresh.slots_freed
        rec.slots_released_to_tree += fresh.slots_released_to_tree
        rec.seconds += fresh.seconds
        rec.decode_compressions += 1
        self.totals.recompressed(fresh.slots_freed, fresh.seconds)
        return rec, False

    def forget(self, rid: str) -> Record | None:
        self.requests.pop(rid, None)
        return self.records.pop(rid, None)

    # -- invariants ----------------------------------------------------------------

    def invariants(self, tree, layouts: dict, captures_pending: int, pool_slots: int, pool_heads: int,
                   decode_windows: int = 0) -> dict:
        """What must hold whenever the scheduler is between steps.

        * ``tree_slots == evictable_slots + protected_slots``: the radix
          tree's own accounting covers every slot it holds;
        * ``compressed_slots_in_tree == 0``: no slot of a running compressed
          request (its ``B`` kept tokens and the ones it decoded since) is
          referenced by the tree, so the tree only ever holds exact KV;
        * ``compressed_slots_shared == 0``: no two running compressed
          requests (nor one twice) point at the same slot: each request's
          compressed KV is its own;
        * ``compressed_rows_shared == 0`` and
          ``compressed_rows_outside_own_slots == 0``: the row layout's rows
          are each held once, inside the slots their request holds.
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
        rows_shared, rows_outside = self._row_checks(tree.req_to_token_pool, layouts, pool_slots, pool_heads)
        return {"tree_slots": tree_slots, "tree_evictable_plus_protected": int(tree.evictable_size())
                + int(tree.protected_size()), "compressed_slots": int(compressed.numel()),
                "compressed_slots_in_tree": in_tree, "compressed_slots_shared": shared,
                "compressed_rows_shared": rows_shared, "compressed_rows_outside_own_slots": rows_outside,
                "captures_pending": captures_pending, "decode_windows": decode_windows}

    def _row_checks(self, req_to_token_pool, layouts: dict, S: int, H: int) -> tuple[int, int]:
        """Rows of the row layout held twice (by two requests, or one twice),
        and rows outside the slots their request holds for its prompt."""
        if not layouts:
            return 0, 0
        table = req_to_token_pool.req_to_token
        all_rows, outside = [], 0
        for rid, (layout, _) in layouts.items():  # every entry's request is in self.requests
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

    def invariants_or_error(self, *args) -> dict:
        try:
            return self.invariants(*args)
        except Exception as exc:  # reporting must never stop the scheduler
            log.exception("kvpolicy: could not check the invariants")
            return {"error": repr(exc)}

    def verify(self, *args) -> None:
        """:meth:`invariants`, logged as an error and counted if broken."""
        inv = self.invariants_or_error(*args)
        if problems := broken_invariants(inv):
            self.totals.invariant_violations += 1
            log.error("kvpolicy: invariant broken: %s (%s)", "; ".join(problems), inv)

    def state(self, policy_name: str, allocator, tree, *invariant_args) -> dict:
        return {
            "policy": policy_name,
            "available_slots": int(allocator.available_size()),
            "evictable_slots": int(tree.evictable_size()),
            "protected_slots": int(tree.protected_size()),
            "totals": asdict(self.totals),
            "running": {rid: vars(r) for rid, r in self.records.items()},
            "invariants": self.invariants_or_error(tree, *invariant_args),
            "events": list(self.events),
        }
