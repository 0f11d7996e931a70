"""Per-head top-c selection in Triton: the hot part of
:func:`kvpolicy.exec.reference.select.pick`, same signature, same result.

SnapKV (arXiv 2404.14469) keeps, for each KV head ``h`` separately, the ``c``
candidates with the highest score ``s[h, n]`` (protected tokens are not
candidates). The reference ranks every head with a stable descending sort of
``N`` scores; ``Picks.order[h]`` is its first ``c`` positions: descending
score, ties by position (earlier first). Here nothing of size ``N`` is sorted:

1. **threshold search** (``_threshold_kernel``, one program per head): every
   score becomes a 32-bit integer key whose integer order is the float order
   (``-0.0`` counts as ``+0.0`` and every NaN as the largest value, as in
   ``torch.sort``; non-candidates become ``-inf`` exactly as in the reference),
   written once to a scratch row. A radix select, 8 bits a pass from the top
   (4 passes, a 256-bin histogram each), finds ``T`` = the key of the
   ``c``-th largest score and how many keys lie above it. The head keeps
   every token with key ``> T`` and the first ``c - #{key > T}`` tokens (by
   position) with key ``== T``: exactly the set of the reference's stable
   sort. A last pass writes the picks compacted, in position order.
2. **order** (``_order_kernel``, programs over heads x blocks of picks): the
   rank of pick ``i`` is the number of picks that the reference sorts before
   it, ``#{j : key_j > key_i} + #{j < i : key_j == key_i}`` (picks are in
   position order, so ``j < i`` is "earlier position"); ``order[h, rank] =
   position``. ``O(c^2)`` comparisons per head, nothing of size ``N``.

Six passes over a head's ``N`` scores in all, one program per row:
:func:`top_c` takes any number of rows, so a caller with many layers or
requests to select for can stack them (``R = layers x H_kv``) and fill the GPU
in one launch. ``unit layer`` runs the same kernel on the head-averaged score
(one row).
``unit pooled`` (AdaKV) needs every head's full ranking and a cross-head sort
of ``H_kv * N`` scores: it stays the reference's torch code, as does the
optional top-p count (a cumulative sum over ``c`` picks).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvpolicy.exec.reference import select as reference
from kvpolicy.exec.reference.select import Picks
from kvpolicy.kernels._launch import jit as _jit
from kvpolicy.kernels._launch import require_triton as _require_triton
from kvpolicy.kernels._launch import tl, triton
from kvpolicy.lang import ir

BLOCK_N = 1024  # tokens per step of the threshold search
BLOCK_ORDER = 64  # picks per side of the order kernel's comparison tile


def pick(selection: ir.Selection, scores: Tensor, candidates: Tensor, c: int) -> Picks:
    """:func:`kvpolicy.exec.reference.select.pick` with the top-``c`` of ``unit head``
    and ``unit layer`` in Triton. ``scores [H_kv, N]``, ``candidates [N]`` or
    ``[H_kv, N]`` bool."""
    H = scores.shape[0]
    if selection.unit == "pooled":
        return reference.pick(selection, scores, candidates, c)
    rows = scores.mean(dim=0, keepdim=True) if selection.unit == "layer" else scores
    order = top_c(rows, candidates, c).expand(H, -1).contiguous()
    counts = torch.full((H,), c, dtype=torch.long, device=scores.device)
    if selection.keep.p is not None:
        counts = reference._top_p_counts(scores, candidates, order, counts, selection.keep.p)
    return Picks(order, counts)


def top_c(scores: Tensor, candidates: Tensor, c: int, *, block: int = BLOCK_N) -> Tensor:
    """``[R, min(c, N)]`` long: per row of ``scores [R, N]``, the positions of
    its ``c`` best candidates by descending score, ties by position — equal to
    ``torch.sort(scores.masked_fill(~candidates, -inf), descending=True,
    stable=True).indices[:, :c]``."""
    _require_triton(scores, _threshold_kernel)
    R, N = scores.shape
    c = max(0, min(c, N))
    order = torch.empty(R, c, dtype=torch.long, device=scores.device)
    if R == 0 or c == 0:
        return order
    cand = candidates.expand(R, N)
    if cand.dtype == torch.bool:
        cand = cand.view(torch.uint8)  # same bytes; a [N] mask keeps its zero row stride
    keys = torch.empty(R, N, dtype=torch.int32, device=scores.device)  # scratch
    picked_keys = torch.empty(R, c, dtype=torch.int32, device=scores.device)
    picked_pos = torch.empty(R, c, dtype=torch.int64, device=scores.device)
    block = min(block, triton.next_power_of_2(N))
    _threshold_kernel[(R,)](scores, scores.stride(0), scores.stride(1), cand, cand.stride(0), cand.stride(1),
                            keys, picked_keys, picked_pos, N, c, BLOCK=block)
    _order_kernel[(R, triton.cdiv(c, BLOCK_ORDER))](picked_keys, picked_pos, order, c, BLOCK=BLOCK_ORDER)
    return order


@_jit
def _threshold_kernel(scores_ptr, s_row, s_col, cand_ptr, c_row, c_col, keys_ptr, picked_key_ptr, picked_pos_ptr,
                      N, c, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # offsets past 2^31 in a long context
    offs0 = tl.arange(0, BLOCK)
    row_keys = keys_ptr + row * N
    # 1. integer keys ordered like the masked scores, written once
    start = 0
    while start < N:
        offs = start + offs0
        inside = offs < N
        s = tl.load(scores_ptr + row * s_row + offs * s_col, mask=inside, other=0.0).to(tl.float32)
        is_cand = tl.load(cand_ptr + row * c_row + offs * c_col, mask=inside, other=0) != 0
        s = tl.where(is_cand, s, float("-inf"))
        s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0
        s = tl.where(s != s, float("nan"), s)  # noqa: PLR0124 - one NaN, above +inf
        bits = s.to(tl.int32, bitcast=True)
        tl.store(row_keys + offs, bits ^ ((bits >> 31) & 0x7FFFFFFF), mask=inside)  # int order == float order
        start += BLOCK
    tl.debug_barrier()
    # 2. radix select, 8 bits a pass from the top: T = the c-th largest key, above = #{key > T}
    digits = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.int64)  # the digits of T - INT32_MIN decided so far
    above = 0  # keys whose decided digits are already larger than T's
    for i in tl.static_range(4):
        shift: tl.constexpr = 24 - 8 * i
        hist = tl.zeros([256], dtype=tl.int32)
        start = 0
        while start < N:
            offs = start + offs0
            inside = offs < N
            u = tl.load(row_keys + offs, mask=inside, other=0).to(tl.int64) + 2147483648  # in [0, 2^32)
            same = inside & ((u >> (shift + 8)) == prefix)
            hist += tl.histogram(((u >> shift) & 255).to(tl.int32), 256, mask=same)
            start += BLOCK
        at_least = above + tl.cumsum(hist, axis=0, reverse=True)  # keys >= (prefix, digit)
        digit = tl.sum((at_least >= c).to(tl.int32), axis=0) - 1  # at_least is non-increasing
        above += tl.sum(tl.where(digits > digit, hist, 0), axis=0)
        prefix = prefix * 256 + digit
    T = (prefix - 2147483648).to(tl.int32)
    ties_wanted = c - above
    # 3. the picks in position order: every key above T, the first ties_wanted keys equal to T
    taken = 0
    ties = 0
    start = 0
    while start < N:
        offs = start + offs0
        inside = offs < N
        key = tl.load(row_keys + offs, mask=inside, other=0)
        tie = (inside & (key == T)).to(tl.int32)
        tie_rank = ties + tl.cumsum(tie, axis=0) - tie
        take = (inside & ((key > T) | ((tie != 0) & (tie_rank < ties_wanted)))).to(tl.int32)
        slot = taken + tl.cumsum(take, axis=0) - take
        tl.store(picked_key_ptr + row * c + slot, key, mask=take != 0)
        tl.store(picked_pos_ptr + row * c + slot, offs.to(tl.int64), mask=take != 0)
        taken += tl.sum(take, axis=0)
        ties += tl.sum(tie, axis=0)
        start += BLOCK


@_jit
def _order_kernel(keys_ptr, pos_ptr, order_ptr, c, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # offsets past 2^31 in a long context
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    key_i = tl.load(keys_ptr + row * c + i, mask=i < c, other=-2147483648)
    rank = tl.zeros([BLOCK], dtype=tl.int32)
    start = 0
    while start < c:
        j = start + tl.arange(0, BLOCK)
        key_j = tl.load(keys_ptr + row * c + j, mask=j < c, other=-2147483648)  # below every float's key
        before = (key_j[None, :] > key_i[:, None]) | ((key_j[None, :] == key_i[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum(before.to(tl.int32), axis=1)
        start += BLOCK
    pos = tl.load(pos_ptr + row * c + i, mask=i < c)
    tl.store(order_ptr + row * c + rank, pos, mask=i < c)
