"""Rank-slot compaction of a paged KV pool in Triton: the kernels of
:mod:`kvpolicy.reference.compact`, same signatures, bit-identical results
(ARCHITECTURE.md § Where compressed KV lives in SGLang: slot ``j`` of a compressed
request holds each KV head's ``j``-th kept token).

For every row ``i`` of a varlen batch (row ``cu[r] + j`` = request ``r``'s
``j``-th kept token) and every KV head ``h``::

    k_buffer[dst_slots[i], h] <- k_buffer[src_slots[i, h], h]      (same for v)

Sources and destinations overlap: a request's destinations are some of its
own source slots (any permutation among them is possible), and Triton has no
grid-wide barrier, so one launch that reads and writes the pool could read a
slot another program already overwrote. Hence two launches:

1. ``_gather_kernel``: every row's K and V, per head from its own source slot,
   into a temporary ``[total_B, H_kv, d]`` (only the kept tokens: about
   ``B / N`` of the request's KV, not a copy of the pool);
2. ``_write_kernel``: the temporary into the destination slots.

Launch 2 alone is :func:`write_slots`, for KV that was computed (merged)
rather than gathered. Both move raw bits (the buffers are viewed as integers
of their element size: fp8/fp16/bf16/fp32 alike, NaN payloads and ``-0.0``
kept), one program per row, K and V in the same program. ``cu_budgets`` is
part of the batch description; rows are independent, so the kernels never
read it (:func:`kvpolicy.reference.compact.validate` checks it, with a host
sync the serving path does not want).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvpolicy.kernels._launch import jit as _jit
from kvpolicy.kernels._launch import require_triton as _require_triton
from kvpolicy.kernels._launch import tl, triton
from kvpolicy.reference.compact import check_shapes

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: Tensor) -> Tensor:
    if x.stride(-1) != 1:
        raise ValueError("KV buffers must be contiguous along head_dim")
    return x.view(_BITS[x.element_size()])


def compact(k_buffer: Tensor, v_buffer: Tensor, src_slots: Tensor, cu_budgets: Tensor, dst_slots: Tensor) -> None:
    """Move every request's kept KV into its first ``B_r`` slots, in place:
    gather into a temporary, then :func:`write_slots`."""
    _require_triton(k_buffer, _gather_kernel)
    check_shapes(k_buffer, v_buffer, src_slots, dst_slots)
    total, H = src_slots.shape
    keys = torch.empty(total, H, k_buffer.shape[2], dtype=k_buffer.dtype, device=k_buffer.device)
    values = torch.empty(total, H, v_buffer.shape[2], dtype=v_buffer.dtype, device=v_buffer.device)
    if total == 0:
        return
    kb, vb = _bits(k_buffer), _bits(v_buffer)
    _gather_kernel[(total,)](kb, vb, kb.stride(0), kb.stride(1), vb.stride(0), vb.stride(1),
                             src_slots.long().contiguous(), _bits(keys), _bits(values), H,
                             kb.shape[2], vb.shape[2], **_blocks(H, kb.shape[2], vb.shape[2]))
    write_slots(k_buffer, v_buffer, dst_slots, keys, values)


def write_slots(k_buffer: Tensor, v_buffer: Tensor, dst_slots: Tensor, keys: Tensor, values: Tensor) -> None:
    """``k_buffer[dst_slots[i]] = keys[i]`` (``[total_B, H_kv, d]``), same for
    values, in one launch."""
    _require_triton(k_buffer, _write_kernel)
    total = dst_slots.shape[0]
    if keys.shape != (total, *k_buffer.shape[1:]) or values.shape != (total, *v_buffer.shape[1:]):
        raise ValueError(f"keys/values must be [total_B, H_kv, d] matching the buffers, got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    if keys.dtype != k_buffer.dtype or values.dtype != v_buffer.dtype:
        raise ValueError(f"dtype mismatch: buffers {k_buffer.dtype}/{v_buffer.dtype}, "
                         f"rows {keys.dtype}/{values.dtype}")
    if total == 0:
        return
    kb, vb = _bits(k_buffer), _bits(v_buffer)
    H = kb.shape[1]
    _write_kernel[(total,)](kb, vb, kb.stride(0), kb.stride(1), vb.stride(0), vb.stride(1),
                            dst_slots.long().contiguous(), _bits(keys.contiguous()), _bits(values.contiguous()),
                            H, kb.shape[2], vb.shape[2], **_blocks(H, kb.shape[2], vb.shape[2]))


def _blocks(H: int, dk: int, dv: int) -> dict:
    return dict(BLOCK_H=triton.next_power_of_2(H), BLOCK_DK=triton.next_power_of_2(dk),
                BLOCK_DV=triton.next_power_of_2(dv))


@_jit
def _gather_kernel(k_ptr, v_ptr, k_slot, k_head, v_slot, v_head, src_ptr, tmp_k_ptr, tmp_v_ptr, H, DK, DV,
                   BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    src = tl.load(src_ptr + row * H + h, mask=h < H, other=0)  # each head its own slot
    dk = tl.arange(0, BLOCK_DK)
    mk = (h < H)[:, None] & (dk < DK)[None, :]
    k = tl.load(k_ptr + src[:, None] * k_slot + h[:, None] * k_head + dk[None, :], mask=mk)
    tl.store(tmp_k_ptr + (row * H + h[:, None]) * DK + dk[None, :], k, mask=mk)
    dv = tl.arange(0, BLOCK_DV)
    mv = (h < H)[:, None] & (dv < DV)[None, :]
    v = tl.load(v_ptr + src[:, None] * v_slot + h[:, None] * v_head + dv[None, :], mask=mv)
    tl.store(tmp_v_ptr + (row * H + h[:, None]) * DV + dv[None, :], v, mask=mv)


@_jit
def _write_kernel(k_ptr, v_ptr, k_slot, k_head, v_slot, v_head, dst_ptr, rows_k_ptr, rows_v_ptr, H, DK, DV,
                  BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    dst = tl.load(dst_ptr + row)  # one slot for all heads
    dk = tl.arange(0, BLOCK_DK)
    mk = (h < H)[:, None] & (dk < DK)[None, :]
    k = tl.load(rows_k_ptr + (row * H + h[:, None]) * DK + dk[None, :], mask=mk)
    tl.store(k_ptr + dst * k_slot + h[:, None] * k_head + dk[None, :], k, mask=mk)
    dv = tl.arange(0, BLOCK_DV)
    mv = (h < H)[:, None] & (dv < DV)[None, :]
    v = tl.load(rows_v_ptr + (row * H + h[:, None]) * DV + dv[None, :], mask=mv)
    tl.store(v_ptr + dst * v_slot + h[:, None] * v_head + dv[None, :], v, mask=mv)
