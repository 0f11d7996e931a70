"""Class assignment and the zero-class merge scatter in Triton: the kernels of
:func:`kvpolicy.exec.reference.merge.classify` and :func:`kvpolicy.exec.reference.merge.scatter`,
same signatures, same results (EMS, arXiv 2412.08521: evict-then-merge with a
zero class; the choices are documented in :mod:`kvpolicy.exec.reference.merge`).

**classify.** Per KV head ``h`` the centres are its tokens picked by score
(``C_h`` of them, in position order). A token ``n`` that is neither kept nor
protected (and, with ``cover``, within the head's score cover) merges into

    c* = argmax_c sim(x_n, x_c)      sim = cos | dot | -||x_n - x_c||

(``x`` = keys or values; ``kv``: ``sim = cos(k) * cos(v)``, both dots in
the same pass; the first centre wins a tie) when ``sim(x_n, x_c*)``
passes the threshold (``cos > t``, ``dot > t``, ``||.|| < t``); its class is
then ``c*``'s slot, otherwise it keeps class 0 (evicted). ``_assign_kernel``
does the similarity, arg-max and threshold in one pass over tokens: programs
over (head, block of tokens), each streaming the head's centres through
``tl.dot`` in fp32 (IEEE, no TF32: a class decision near the threshold must
not move). Nothing of size ``N x C`` is materialised (the reference builds the
full ``[H_kv, N, C]`` similarity). The slot numbering, the cover mask (it needs
a sort over ``N``) and the weights stay in torch.

**scatter.** With weights ``w`` (score or uniform, 0 for evicted tokens) the
centre ``k`` of class members ``M_k`` becomes

    key   = u / ||u|| * (sum_M w ||x||) / (sum_M w),  u = sum_M w x / ||x||
    value = (sum_M w v) / (sum_M w)

(key direction and norm averaged separately); a class with no member but its
centre keeps its token bit for bit, and class 0 is never accumulated.
``_accumulate_kernel`` atomically adds the folded-in tokens (members other
than the kept token itself: usually a small share of ``N``) into fp32 sums;
``_finalize_kernel`` adds each slot's own token and writes ``[H_kv, K, d]``.
Float atomics make the summation order, hence the last bits, vary: results
equal the reference within fp32 rounding, not bit for bit.

``l2`` merges at a distance below the threshold and a head without centres
merges nothing, as in the reference and :class:`kvpolicy.lang.ir.MergeSimilar`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvpolicy.exec.reference import merge as reference
from kvpolicy.exec.reference.merge import Classes
from kvpolicy.kernels._launch import jit as _jit
from kvpolicy.kernels._launch import require_triton as _require_triton
from kvpolicy.kernels._launch import tl, triton
from kvpolicy.lang import ir

BLOCK_TOKENS = 32  # tokens per program (classify, accumulate)
BLOCK_CENTRES = 32  # centres per tl.dot tile
BLOCK_SLOTS = 16  # slots per program (finalize)
METRICS = {"cosine": 0, "dot": 1, "l2": 2}


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# --------------------------------------------------------------------------- classify


def classify(keys: Tensor, values: Tensor, scores: Tensor, kept: Tensor, centres: Tensor,
             merge: ir.MergeSimilar | None, protected: Tensor) -> Classes:
    """:func:`kvpolicy.exec.reference.merge.classify` with the similarity, arg-max
    and threshold in Triton. ``keys``/``values`` ``[H_kv, N, d]``, ``scores``,
    ``kept``, ``centres`` ``[H_kv, N]``, ``protected`` ``[N]``."""
    _require_triton(keys, _assign_kernel)
    H, N = kept.shape
    slot_of, kept_positions = reference.kept_slots(kept)
    class_id = slot_of.clone()
    if merge is not None and centres.any():
        may = ~kept & ~protected[None, :]
        if merge.cover is not None:
            may &= reference._within_cover(scores, kept, protected, merge.cover)
        centre_pos, centre_slot = _centre_table(centres, slot_of)
        vectors = [_last_dim_contiguous(x) for x in reference.merge_vectors(keys, values, merge)]
        first, second = vectors[0], vectors[-1]  # the same tensor unless kv (PRODUCT)
        d = first.shape[-1]
        grid = (H, triton.cdiv(N, BLOCK_TOKENS))
        _assign_kernel[grid](first, first.stride(0), first.stride(1), second, second.stride(0), second.stride(1),
                             centre_pos, centre_slot, may.to(torch.uint8).contiguous(), class_id, N,
                             centre_pos.shape[1], d, float(merge.threshold), METRIC=METRICS[merge.metric],
                             PRODUCT=len(vectors) == 2,
                             BLOCK_N=BLOCK_TOKENS, BLOCK_C=BLOCK_CENTRES, BLOCK_D=_block_d(d))
    return reference.classes_from_ids(class_id, kept, kept_positions, scores, merge)


def _centre_table(centres: Tensor, slot_of: Tensor) -> tuple[Tensor, Tensor]:
    """``[H_kv, C]`` int32: each head's centre positions in position order
    (``-1`` past its count) and their slots."""
    H = centres.shape[0]
    C = int(centres.sum(dim=1).max())
    rank = centres.long().cumsum(dim=1) - 1
    rows, cols = centres.nonzero(as_tuple=True)
    pos = torch.full((H, C), -1, dtype=torch.long, device=centres.device)
    pos[rows, rank[rows, cols]] = cols
    slot = slot_of.gather(1, pos.clamp_min(0))
    return pos.to(torch.int32), slot.to(torch.int32)


@_jit
def _assign_kernel(x_ptr, x_h, x_n, z_ptr, z_h, z_n, centre_pos_ptr, centre_slot_ptr, may_ptr, class_ptr, N, C, D,
                   threshold, METRIC: tl.constexpr, PRODUCT: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    # PRODUCT (similar(kv, cosine > t)): sim = cos(x_n, x_c) * cos(z_n, z_c),
    # x the keys and z the values; otherwise z is x and unused.
    h = tl.program_id(0).to(tl.int64)  # offsets past 2^31 in a long context
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    may = tl.load(may_ptr + h * N + n, mask=n < N, other=0) != 0
    x = tl.load(x_ptr + h * x_h + n[:, None] * x_n + d[None, :], mask=may[:, None] & (d < D)[None, :],
                other=0.0).to(tl.float32)
    if METRIC == 0:
        x = x / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)[:, None]
    x_sq = tl.sum(x * x, axis=1)
    if PRODUCT:
        z = tl.load(z_ptr + h * z_h + n[:, None] * z_n + d[None, :], mask=may[:, None] & (d < D)[None, :],
                    other=0.0).to(tl.float32)
        z = z / tl.maximum(tl.sqrt(tl.sum(z * z, axis=1)), 1e-12)[:, None]
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_c = tl.zeros([BLOCK_N], dtype=tl.int32)
    start = 0
    while start < C:
        c = start + tl.arange(0, BLOCK_C)
        pos = tl.load(centre_pos_ptr + h * C + c, mask=c < C, other=-1)
        valid = pos >= 0
        y = tl.load(x_ptr + h * x_h + pos[:, None] * x_n + d[None, :], mask=valid[:, None] & (d < D)[None, :],
                    other=0.0).to(tl.float32)
        if METRIC == 0:
            y = y / tl.maximum(tl.sqrt(tl.sum(y * y, axis=1)), 1e-12)[:, None]
        sim = tl.dot(x, tl.trans(y), input_precision="ieee")
        if METRIC == 2:  # minus the squared distance: same arg-max as minus the distance
            sim = 2.0 * sim - x_sq[:, None] - tl.sum(y * y, axis=1)[None, :]
        if PRODUCT:
            w = tl.load(z_ptr + h * z_h + pos[:, None] * z_n + d[None, :], mask=valid[:, None] & (d < D)[None, :],
                        other=0.0).to(tl.float32)
            w = w / tl.maximum(tl.sqrt(tl.sum(w * w, axis=1)), 1e-12)[:, None]
            sim = sim * tl.dot(z, tl.trans(w), input_precision="ieee")
        sim = tl.where(valid[None, :], sim, float("-inf"))
        block_best = tl.max(sim, axis=1)
        better = block_best > best  # strict: an earlier centre keeps a tie
        best_c = tl.where(better, start + tl.argmax(sim, axis=1, tie_break_left=True), best_c)
        best = tl.where(better, block_best, best)
        start += BLOCK_C
    if METRIC == 2:
        passes = (threshold > 0) & (-best < threshold * threshold)
    else:
        passes = best > threshold
    merge = may & passes
    slot = tl.load(centre_slot_ptr + h * C + best_c, mask=merge, other=0)
    tl.store(class_ptr + h * N + n, slot.to(tl.int64), mask=merge)


# --------------------------------------------------------------------------- scatter


def scatter(keys: Tensor, values: Tensor, classes: Classes) -> tuple[Tensor, Tensor]:
    """:func:`kvpolicy.exec.reference.merge.scatter` in Triton: ``(keys, values)``
    ``[H_kv, K, d]`` in the input dtype, unused slots zero."""
    _require_triton(keys, _accumulate_kernel)
    H, N, d = keys.shape
    K = classes.kept_positions.shape[1]
    device = keys.device
    keys, values = _last_dim_contiguous(keys), _last_dim_contiguous(values)
    class_id = classes.class_id.contiguous()
    weight = classes.weight.float().contiguous()
    kept_positions = classes.kept_positions.contiguous()
    dir_sum = torch.zeros(H, K, d, dtype=torch.float32, device=device)
    val_sum = torch.zeros(H, K, d, dtype=torch.float32, device=device)
    norm_sum = torch.zeros(H, K, dtype=torch.float32, device=device)
    w_sum = torch.zeros(H, K, dtype=torch.float32, device=device)
    members = torch.zeros(H, K, dtype=torch.int32, device=device)
    out_k = torch.empty(H, K, d, dtype=keys.dtype, device=device)
    out_v = torch.empty(H, K, d, dtype=values.dtype, device=device)
    if H == 0 or K == 0:
        return out_k, out_v
    strides = (keys.stride(0), keys.stride(1), values.stride(0), values.stride(1))
    _accumulate_kernel[(H, triton.cdiv(N, BLOCK_TOKENS))](
        keys, values, *strides, class_id, weight, kept_positions, dir_sum, val_sum, norm_sum, w_sum, members,
        N, K, d, BLOCK_N=BLOCK_TOKENS, BLOCK_D=_block_d(d))
    _finalize_kernel[(H, triton.cdiv(K, BLOCK_SLOTS))](
        keys, values, *strides, weight, kept_positions, dir_sum, val_sum, norm_sum, w_sum, members,
        out_k, out_v, N, K, d, BLOCK_K=BLOCK_SLOTS, BLOCK_D=_block_d(d))
    return out_k, out_v


@_jit
def _accumulate_kernel(k_ptr, v_ptr, k_h, k_n, v_h, v_n, class_ptr, weight_ptr, kept_pos_ptr,
                       dir_ptr, val_ptr, norm_ptr, wsum_ptr, members_ptr, N, K, D,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)  # offsets past 2^31 in a long context
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    cls = tl.load(class_ptr + h * N + n, mask=n < N, other=0)
    own = tl.load(kept_pos_ptr + h * K + cls - 1, mask=cls > 0, other=-1)
    folded = (cls > 0) & (own != n)  # a member other than the slot's own token
    m2 = folded[:, None] & (d < D)[None, :]
    w = tl.load(weight_ptr + h * N + n, mask=folded, other=0.0)
    x = tl.load(k_ptr + h * k_h + n[:, None] * k_n + d[None, :], mask=m2, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + h * v_h + n[:, None] * v_n + d[None, :], mask=m2, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    unit = x / tl.maximum(norm, 1e-12)[:, None]
    slot = h * K + cls - 1
    tl.atomic_add(dir_ptr + slot[:, None] * D + d[None, :], w[:, None] * unit, mask=m2, sem="relaxed")
    tl.atomic_add(val_ptr + slot[:, None] * D + d[None, :], w[:, None] * v, mask=m2, sem="relaxed")
    tl.atomic_add(norm_ptr + slot, w * norm, mask=folded, sem="relaxed")
    tl.atomic_add(wsum_ptr + slot, w, mask=folded, sem="relaxed")
    tl.atomic_add(members_ptr + slot, 1, mask=folded, sem="relaxed")


@_jit
def _finalize_kernel(k_ptr, v_ptr, k_h, k_n, v_h, v_n, weight_ptr, kept_pos_ptr,
                     dir_ptr, val_ptr, norm_ptr, wsum_ptr, members_ptr, out_k_ptr, out_v_ptr, N, K, D,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.program_id(0).to(tl.int64)  # offsets past 2^31 in a long context
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    in_k = k < K
    pos = tl.load(kept_pos_ptr + h * K + k, mask=in_k, other=-1)
    valid = pos >= 0
    m2 = valid[:, None] & (d < D)[None, :]
    own_k = tl.load(k_ptr + h * k_h + pos[:, None] * k_n + d[None, :], mask=m2, other=0.0)
    own_v = tl.load(v_ptr + h * v_h + pos[:, None] * v_n + d[None, :], mask=m2, other=0.0)
    w = tl.load(weight_ptr + h * N + pos, mask=valid, other=0.0)
    x = own_k.to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    slot = h * K + k
    acc = slot[:, None] * D + d[None, :]
    direction = tl.load(dir_ptr + acc, mask=m2, other=0.0) + w[:, None] * (x / tl.maximum(norm, 1e-12)[:, None])
    val = tl.load(val_ptr + acc, mask=m2, other=0.0) + w[:, None] * own_v.to(tl.float32)
    norm_sum = tl.load(norm_ptr + slot, mask=valid, other=0.0) + w * norm
    w_sum = tl.maximum(tl.load(wsum_ptr + slot, mask=valid, other=0.0) + w, 1e-30)
    length = tl.maximum(tl.sqrt(tl.sum(direction * direction, axis=1)), 1e-30)
    merged_k = direction / length[:, None] * (norm_sum / w_sum)[:, None]
    merged_v = val / w_sum[:, None]
    alone = (tl.load(members_ptr + slot, mask=valid, other=0) == 0)[:, None]
    out_k = tl.where(alone, own_k, merged_k.to(own_k.dtype))  # a lone centre keeps its bits; zero if unused
    out_v = tl.where(alone, own_v, merged_v.to(own_v.dtype))
    out = slot[:, None] * D + d[None, :]
    mask_out = in_k[:, None] & (d < D)[None, :]
    tl.store(out_k_ptr + out, out_k, mask=mask_out)
    tl.store(out_v_ptr + out, out_v, mask=mask_out)
