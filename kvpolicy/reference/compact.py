"""Rank-slot compaction of a paged KV pool, in plain torch (ARCHITECTURE.md § Where
compressed KV lives in SGLang).

SGLang keeps one layer's KV per token slot, ``k_buffer[slot, kv_head, :]``
(``MHATokenToKVPool``; ``v_buffer`` likewise, its head dim may differ). After
compression request ``r`` keeps ``B_r`` tokens per KV head; in the rank-slot
layout slot ``j`` of the request holds, for each head ``h``, that head's
``j``-th kept token, so the request needs ``B_r`` slots instead of ``N_r``.

A batch is described varlen: ``cu_budgets [R+1]`` offsets (``cu[0] = 0``,
``cu[R] = total_B``); row ``cu[r] + j`` of ``src_slots [total_B, H_kv]``
holds, for each head, the pool slot of that head's ``j``-th kept token of
request ``r``, and ``dst_slots [total_B]`` the slot that receives the row (the
request's first ``B_r`` slots). :func:`compact` moves, for every row ``i`` and
head ``h``::

    k_buffer[dst_slots[i], h] <- k_buffer[src_slots[i, h], h]      (same for v)

in place. Sources and destinations overlap (a request's destinations are some
of its own sources), so every source is read into a temporary before any
destination is written. :func:`write_slots` is the second half alone, for KV
that was computed (merged) rather than gathered.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor


def compact(k_buffer: Tensor, v_buffer: Tensor, src_slots: Tensor, cu_budgets: Tensor, dst_slots: Tensor) -> None:
    """Move every request's kept KV into its first ``B_r`` slots, in place."""
    validate(k_buffer, v_buffer, src_slots, cu_budgets, dst_slots)
    heads = torch.arange(k_buffer.shape[1], device=k_buffer.device)
    keys = k_buffer[src_slots, heads]  # advanced indexing copies: [total_B, H_kv, d]
    values = v_buffer[src_slots, heads]
    write_slots(k_buffer, v_buffer, dst_slots, keys, values)


def write_slots(k_buffer: Tensor, v_buffer: Tensor, dst_slots: Tensor, keys: Tensor, values: Tensor) -> None:
    """``k_buffer[dst_slots[i]] = keys[i]`` (``[total_B, H_kv, d]``), same for values."""
    k_buffer[dst_slots] = keys
    v_buffer[dst_slots] = values


def validate(k_buffer: Tensor, v_buffer: Tensor, src_slots: Tensor, cu_budgets: Tensor, dst_slots: Tensor) -> None:
    """Shapes, offsets and slot ranges of a compaction batch; each destination
    at most once (else the result would depend on write order). Reads the
    tensors back (host sync): for the reference and tests, not the serving path."""
    check_shapes(k_buffer, v_buffer, src_slots, dst_slots)
    S, total = k_buffer.shape[0], dst_slots.shape[0]
    cu = cu_budgets.tolist()
    if cu_budgets.dim() != 1 or not cu or cu[0] != 0 or cu[-1] != total or any(a > b for a, b in pairwise(cu)):
        raise ValueError(f"cu_budgets must rise from 0 to total_B={total}, got {cu}")
    for name, slots in (("src_slots", src_slots), ("dst_slots", dst_slots)):
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= S):
            raise ValueError(f"{name} must lie in [0, {S}) (pool slots)")
    if dst_slots.unique().numel() != total:
        raise ValueError("dst_slots repeats a slot")


def check_shapes(k_buffer: Tensor, v_buffer: Tensor, src_slots: Tensor, dst_slots: Tensor) -> None:
    """The cheap checks (no host sync)."""
    if k_buffer.dim() != 3 or v_buffer.dim() != 3 or k_buffer.shape[:2] != v_buffer.shape[:2]:
        raise ValueError(f"k_buffer/v_buffer must be [S, H_kv, d], got {tuple(k_buffer.shape)} and "
                         f"{tuple(v_buffer.shape)}")
    H = k_buffer.shape[1]
    if src_slots.dim() != 2 or src_slots.shape[1] != H or dst_slots.shape != src_slots.shape[:1]:
        raise ValueError(f"src_slots must be [total_B, {H}] and dst_slots [total_B], got "
                         f"{tuple(src_slots.shape)} and {tuple(dst_slots.shape)}")
    if src_slots.dtype.is_floating_point or dst_slots.dtype.is_floating_point:
        raise ValueError("slot tensors must be integer")
