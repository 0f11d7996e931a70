"""Triton kernels for the attention statistics the scores read, with the
signatures of :mod:`kvpolicy.exec.reference.attention` (the pure-torch reference
beside each one) and never more than one tile of logits at a time.

* :func:`window_attention`: softmax rows of the last ``window`` queries over all
  ``N`` keys (SnapKV, arXiv 2404.14469 eq. 1), ``[H, window, N]`` fp32.
* :func:`window_scores`: the same rows already reduced to what a ``local()``
  score needs, ``[H_kv, N]``: summed (or max'd) over the window queries, pooled
  per query head over the tokens before the window (SnapKV eq. 2), then reduced
  over each GQA group -- :func:`window_scores_reference` composes the reference
  stages the same way, as :func:`kvpolicy.exec.reference.scores.local_term` does.
* :func:`split_decode_attention`: one decode step for a compressed request
  whose KV heads keep different numbers of tokens, one sequence per (request,
  KV head) reading its kept prompt rows and its decoded tokens.
* :func:`accumulated_attention` / :func:`attention_with_column_sums`: H2O's
  accumulated attention (arXiv 2306.14048 §3), ``s[h, j] = sum_{i >= j}
  softmax_i(q_i K^T / sqrt(d))[j]``, and optionally the causal attention output
  from the same softmax rows.

Every kernel is an online softmax in two passes over key tiles (FlashAttention's
running max ``m`` and sum ``l``): pass 1 finds each query row's log-sum-exp
``lse = m + log l``, pass 2 recomputes the logits of one tile and uses
``exp(logit - lse)`` directly. Exponentials are base 2 with ``log2(e)`` folded
into the scale (``qk_scale``), so ``lse`` is kept in base-2 units. Logits are
fp32: fp16/bf16 operands go to ``tl.dot`` as they are (exact products, fp32
accumulation, like the reference's upcast); fp32 operands use ``tf32x3`` (three
TF32 tensor-core products: about fp32 accuracy, unlike plain TF32; Triton's
``ieee`` fp32 dot spills registers at these tile sizes).

GQA: query head ``h`` reads KV head ``h // n_rep``. The window kernels pack the
``n_rep * window`` query rows of a KV group into one tile, so a key tile is
loaded once for the whole group.

Kernels launch compiled on CUDA tensors, or in Triton's interpreter when Triton
was imported with ``TRITON_INTERPRET=1`` (see :mod:`kvpolicy.kernels`).
Importing this module needs no Triton; calling a kernel without it raises.
"""

# No `from __future__ import annotations`: Triton's interpreter recognises a
# constexpr parameter only by an evaluated ``tl.constexpr`` annotation.

import math
from collections.abc import Callable

import torch
from torch import Tensor

from kvpolicy.exec.reference import attention as reference
from kvpolicy.exec.reference.scores import window_scores as reference_window_scores
from kvpolicy.kernels import interpreted, require

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels below still define; launching one raises (kvpolicy.kernels.require)
    triton = None

    class tl:  # stands in for triton.language in the kernels' constexpr annotations
        constexpr = "constexpr"

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Tile sizes. BLOCK_M/BLOCK_N >= 16 (tl.dot's minimum). Per-call keywords
# override them (the tests use small ones so that N is not a multiple).
WINDOW_BLOCK_M = 64  # packed (head, window query) rows per tile
WINDOW_BLOCK_N = 64  # keys per tile
CAUSAL_BLOCK = 64    # accumulated attention: query rows and keys per tile

__all__ = [
    "accumulated_attention",
    "attention_with_column_sums",
    "split_decode_attention",
    "window_attention",
    "window_scores",
    "window_scores_reference",
]


# ---------------------------------------------------------------------------
# launching


class _kernel:  # lower case: used as a decorator
    """``@triton.jit``, deferred to the first launch, so that importing this
    module needs no Triton and the form built (compiled or interpreted) is the
    one Triton itself was imported in. ``kernel[grid](...)`` as with Triton."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._built = None

    def __getitem__(self, grid):
        if self._built is None:
            if interpreted():
                from triton.runtime.interpreter import InterpretedFunction
                self._built = InterpretedFunction(self.fn)
            else:
                self._built = triton.jit(self.fn)
        return self._built[grid]


def _prepare(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Check that kernels can run here; last dim contiguous; one dtype (fp32 if mixed)."""
    device = tensors[0].device
    require(str(device))
    dtypes = {t.dtype for t in tensors}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"kernels take fp32, fp16 or bf16 tensors, not {dtype}")
    out = []
    for t in tensors:
        if t.device != device:
            raise ValueError(f"tensors on {t.device} and {device}")
        t = t.to(dtype)
        out.append(t if t.stride(-1) == 1 else t.contiguous())
    return tuple(out)


def _dot_f32(dtype: torch.dtype) -> bool:
    """Whether logits come from fp32 operands (``tf32x3``): fp32 inputs, and bf16
    under the interpreter, whose numpy ``dot`` cannot read bf16 (it holds it as
    uint16); bf16 products are exact in fp32, so the result is the same."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreted())


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def _tile(block: int) -> int:
    """A tile edge from a ``block`` request: a power of two, at least 16."""
    if block < 1:
        raise ValueError(f"block {block} must be positive")
    return max(16, 1 << (block.bit_length() - 1))


def _launch_opts(device: torch.device) -> dict:
    return {"num_warps": 4, "num_stages": 2} if device.type == "cuda" else {}


def _window_shape(queries: Tensor, keys: Tensor, n_rep: int, window: int | None) -> tuple[int, int, int, int, int]:
    H, W_cap, d = queries.shape
    H_kv, N, d_k = keys.shape
    if d_k != d or H != H_kv * n_rep:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} do not match n_rep={n_rep}")
    w = W_cap if window is None else window
    if not 1 <= w <= W_cap:
        raise ValueError(f"window {w} needs 1..{W_cap} captured queries")
    if w > N:
        raise ValueError(f"window {w} is longer than the {N} keys")
    return H, H_kv, N, d, w


# ---------------------------------------------------------------------------
# observation-window attention


@_kernel
def _window_stats_kernel(Q, K, M_out, L_out,
                         stride_qh, stride_qw, stride_kh, stride_kn,
                         N, W_cap, w, n_rep, D, qk_scale, keys_per_split,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_F32: tl.constexpr):
    """Pass 1: per packed row ``r`` (query head ``g * n_rep + r // w``, window
    query ``r % w`` at position ``N - w + r % w``) the running max and sum of
    ``2^(qk_scale * q.k)`` over this program's split of the keys.
    Grid: (KV head g, row block, key split); out ``[splits, H * w]``."""
    g = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    rows = n_rep * w
    row_ok = r < rows
    i = r % w
    pos = N - w + i
    dd = tl.arange(0, BLOCK_D)
    q_ptr = Q + (g * n_rep + r // w).to(tl.int64)[:, None] * stride_qh + (W_cap - w + i)[:, None] * stride_qw
    q = tl.load(q_ptr + dd[None, :], mask=row_ok[:, None] & (dd < D)[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + g.to(tl.int64) * stride_kh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    start = split * keys_per_split
    for n0 in range(start, start + keys_per_split, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + j[:, None].to(tl.int64) * stride_kn + dd[None, :],
                    mask=(j < N)[:, None] & (dd < D)[None, :], other=0.0)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="tf32x3")
        else:
            s = tl.dot(q, tl.trans(k))
        visible = (j[None, :] <= pos[:, None]) & (j < N)[None, :]
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
        l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m = m_new
    out = split.to(tl.int64) * (n_rep * w * tl.num_programs(0)) + g * rows + r
    tl.store(M_out + out, m, mask=row_ok)
    tl.store(L_out + out, l, mask=row_ok)


@_kernel
def _window_probs_kernel(Q, K, LSE, P,
                         stride_qh, stride_qw, stride_kh, stride_kn,
                         N, W_cap, w, n_rep, D, qk_scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_F32: tl.constexpr):
    """Pass 2: one ``[BLOCK_M, BLOCK_N]`` tile of normalised probabilities
    ``2^(qk_scale * q.k - lse)`` into ``P [H * w, N]`` (packed rows are
    ``P``'s rows: ``(g * n_rep + r // w) * w + r % w = g * n_rep * w + r``).
    Grid: (KV head g, row block, key block)."""
    g = tl.program_id(0)
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = r < n_rep * w
    i = r % w
    dd = tl.arange(0, BLOCK_D)
    q_ptr = Q + (g * n_rep + r // w).to(tl.int64)[:, None] * stride_qh + (W_cap - w + i)[:, None] * stride_qw
    q = tl.load(q_ptr + dd[None, :], mask=row_ok[:, None] & (dd < D)[None, :], other=0.0)
    k = tl.load(K + g.to(tl.int64) * stride_kh + j[:, None].to(tl.int64) * stride_kn + dd[None, :],
                mask=(j < N)[:, None] & (dd < D)[None, :], other=0.0)
    if DOT_F32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="tf32x3")
    else:
        s = tl.dot(q, tl.trans(k))
    row = (g * n_rep * w + r).to(tl.int64)
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    visible = (j[None, :] <= (N - w + i)[:, None]) & (j < N)[None, :]
    p = tl.exp2(tl.where(visible, s * qk_scale - lse[:, None], float("-inf")))
    tl.store(P + row[:, None] * N + j[None, :], p, mask=row_ok[:, None] & (j < N)[None, :])


def _window_lse(q: Tensor, k: Tensor, n_rep: int, w: int, qk_scale: float, block_m: int, block_n: int,
                keys_per_split: int | None) -> Tensor:
    """Pass 1 of the window kernels: ``lse`` (base 2) per (query head, window
    query), ``[H * w]`` fp32, the key splits combined here (a log-sum-exp over
    at most a few hundred partial sums per row)."""
    H, W_cap, d = q.shape
    H_kv, N, _ = k.shape
    row_blocks = triton.cdiv(n_rep * w, block_m)
    if keys_per_split is None:
        keys_per_split = N
        if q.is_cuda:  # enough programs to fill the GPU: about two per SM
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            splits = max(1, min(triton.cdiv(2 * sms, H_kv * row_blocks), triton.cdiv(N, block_n)))
            keys_per_split = triton.cdiv(N, splits)
    keys_per_split = triton.cdiv(keys_per_split, block_n) * block_n
    splits = triton.cdiv(N, keys_per_split)
    m = torch.empty(splits, H * w, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    _window_stats_kernel[(H_kv, row_blocks, splits)](
        q, k, m, l, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        N, W_cap, w, n_rep, d, qk_scale, keys_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(d), DOT_F32=_dot_f32(q.dtype), **_launch_opts(q.device))
    if splits == 1:
        return m[0] + torch.log2(l[0])
    # a split a row sees nothing of has m = -inf, l = 0: its term is -inf, dropped by logsumexp
    return torch.logsumexp((m + torch.log2(l)) * LN2, dim=0) / LN2


def window_attention(queries: Tensor, keys: Tensor, n_rep: int, window: int | None = None,
                     scale: float | None = None, *, block_m: int = WINDOW_BLOCK_M, block_n: int = WINDOW_BLOCK_N,
                     keys_per_split: int | None = None) -> Tensor:
    """Softmax rows of the last ``window`` prompt queries over all ``N`` keys
    (SnapKV, arXiv 2404.14469 eq. 1); as :func:`kvpolicy.exec.reference.attention.window_attention`.

    ``queries [H, W_cap, d]`` are the last ``W_cap`` prompt queries (positions
    ``N - W_cap .. N - 1``), ``keys [H_kv, N, d]``; ``window <= W_cap`` of them
    are used. Returns ``[H, window, N]`` fp32, causal: the query at position
    ``N - w + i`` sees keys ``j <= N - w + i``. ``scale`` defaults to ``1 / sqrt(d)``.

    Pass 1 (online softmax over key tiles, split across programs when
    ``keys_per_split`` or the GPU asks for it) gives each row's log-sum-exp;
    pass 2 writes each probability tile once.
    """
    H, H_kv, N, d, w = _window_shape(queries, keys, n_rep, window)
    q, k = _prepare(queries, keys)
    qk_scale = (1.0 / math.sqrt(d) if scale is None else scale) * LOG2E
    block_m, block_n = _tile(min(block_m, _pow2(n_rep * w))), _tile(block_n)
    lse = _window_lse(q, k, n_rep, w, qk_scale, block_m, block_n, keys_per_split)
    probs = torch.empty(H, w, N, dtype=torch.float32, device=q.device)
    grid = (H_kv, triton.cdiv(n_rep * w, block_m), triton.cdiv(N, block_n))
    _window_probs_kernel[grid](
        q, k, lse, probs, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        N, q.shape[1], w, n_rep, d, qk_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_pow2(d), DOT_F32=_dot_f32(q.dtype), **_launch_opts(q.device))
    return probs


# ---------------------------------------------------------------------------
# fused local() score: window attention -> reduce over the window -> pool -> GQA


@_kernel
def _window_scores_kernel(Q, K, LSE, OUT,
                          stride_qh, stride_qw, stride_kh, stride_kn,
                          N, W_cap, w, n_rep, D, qk_scale,
                          BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          WINDOW_MAX: tl.constexpr, POOL: tl.constexpr, POOL_MAX: tl.constexpr,
                          GQA_MAX: tl.constexpr, DOT_F32: tl.constexpr):
    """``OUT[g, j]`` for one tile of keys of KV head ``g``. The tile starts
    ``PAD = POOL // 2`` keys early and ends ``PAD`` late (a halo, recomputed by
    the neighbouring tiles) so that every output's pooling neighbourhood is in
    registers; outputs are the tile's middle ``BLOCK_N - 2 * PAD`` keys.
    Grid: (KV head g, output tile)."""
    PAD: tl.constexpr = POOL // 2
    g = tl.program_id(0)
    t = tl.arange(0, BLOCK_N)
    j = tl.program_id(1) * (BLOCK_N - 2 * PAD) - PAD + t
    key_ok = (j >= 0) & (j < N)
    dd = tl.arange(0, BLOCK_D)
    k = tl.load(K + g.to(tl.int64) * stride_kh + j[:, None].to(tl.int64) * stride_kn + dd[None, :],
                mask=key_ok[:, None] & (dd < D)[None, :], other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
    prefix = N - w  # tokens before the window: the pooled ones
    in_prefix = (j >= 0) & (j < prefix)
    if POOL > 1:
        near = tl.abs(t[:, None] - t[None, :]) <= PAD  # near[s, u]: s is in u's pooling window
    if GQA_MAX:
        acc = tl.full([BLOCK_N], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
    for hl in range(n_rep):
        h = g * n_rep + hl
        raw = tl.zeros([BLOCK_N], tl.float32)  # probabilities are >= 0, so 0 is also max's identity
        for w0 in range(0, w, BLOCK_W):
            i = w0 + tl.arange(0, BLOCK_W)
            row_ok = i < w
            q = tl.load(Q + h.to(tl.int64) * stride_qh + (W_cap - w + i)[:, None] * stride_qw + dd[None, :],
                        mask=row_ok[:, None] & (dd < D)[None, :], other=0.0)
            if DOT_F32:
                s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="tf32x3")
            else:
                s = tl.dot(q, tl.trans(k))
            lse = tl.load(LSE + h * w + i, mask=row_ok, other=0.0)
            visible = row_ok[:, None] & key_ok[None, :] & (j[None, :] <= (N - w + i)[:, None])
            p = tl.exp2(tl.where(visible, s * qk_scale - lse[:, None], float("-inf")))
            if WINDOW_MAX:
                raw = tl.maximum(raw, tl.max(p, 0))
            else:
                raw += tl.sum(p, 0)
        if POOL > 1:
            # pool_tokens over the prefix only, padded at both of its ends
            # (avg counts the zero padding; max pads with -inf); window tokens keep raw
            if POOL_MAX:
                src = tl.where(in_prefix, raw, float("-inf"))
                pooled = tl.max(tl.where(near, src[:, None], float("-inf")), 0)
            else:
                src = tl.where(in_prefix, raw, 0.0)
                pooled = tl.sum(tl.where(near, src[:, None], 0.0), 0) / POOL
            raw = tl.where(in_prefix, pooled, raw)
        if GQA_MAX:
            acc = tl.maximum(acc, raw)
        else:
            acc += raw
    if not GQA_MAX:
        acc = acc / n_rep
    out_ok = (t >= PAD) & (t < BLOCK_N - PAD) & (j < N)
    tl.store(OUT + g.to(tl.int64) * N + j, acc, mask=out_ok)


def _check_reductions(reduce: str, gqa: str, pool) -> tuple[str, int]:
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce over the window is 'sum' or 'max', not {reduce!r}")
    if gqa not in ("mean", "max"):
        raise ValueError(f"gqa is 'mean' or 'max', not {gqa!r}")
    if pool is None or pool.size == 1:
        return "avg", 1
    if pool.kind not in ("avg", "max") or pool.size < 1 or pool.size % 2 == 0:
        raise ValueError(f"pool {pool.kind}({pool.size}): kind avg or max, size odd and positive")
    return pool.kind, pool.size


def window_scores(queries: Tensor, keys: Tensor, n_rep: int, window: int | None = None,
                  scale: float | None = None, *, reduce: str = "sum", gqa: str = "mean", pool=None,
                  block_n: int = WINDOW_BLOCK_N, block_w: int = 64, block_m: int = WINDOW_BLOCK_M,
                  keys_per_split: int | None = None) -> Tensor:
    """The ``local()`` score straight from queries and keys, ``[H_kv, N]`` fp32,
    never holding the ``[H, window, N]`` probabilities.

    For each query head, the window attention (as :func:`window_attention`)
    summed over the window queries (``reduce="max"``: max'd) -- SnapKV's vote,
    arXiv 2404.14469 eq. 1 -- then pooled along the tokens before the window
    (``pool``: a :class:`kvpolicy.lang.ir.Pool` or anything with ``kind`` ``avg|max``
    and an odd ``size``; same length, zero padding counted by ``avg``, as
    :func:`kvpolicy.exec.reference.scores.pool_tokens`; eq. 2), the window's own
    tokens keeping their raw values, then reduced over each GQA group of
    ``n_rep`` query heads (``gqa="mean"|"max"``). Equal to
    :func:`window_scores_reference`, and for ``reduce="sum"`` to
    :func:`kvpolicy.exec.reference.scores.local_term` over all heads.
    """
    _, H_kv, N, d, w = _window_shape(queries, keys, n_rep, window)
    pool_kind, pool_size = _check_reductions(reduce, gqa, pool)
    q, k = _prepare(queries, keys)
    qk_scale = (1.0 / math.sqrt(d) if scale is None else scale) * LOG2E
    block_m = _tile(min(block_m, _pow2(n_rep * w)))
    lse = _window_lse(q, k, n_rep, w, qk_scale, block_m, _tile(block_n), keys_per_split)
    pad = pool_size // 2
    block_n = max(_tile(block_n), _pow2(4 * pad))  # at least half of each tile is output
    block_w = _tile(min(block_w, _pow2(w)))
    out = torch.empty(H_kv, N, dtype=torch.float32, device=q.device)
    grid = (H_kv, triton.cdiv(N, block_n - 2 * pad))
    _window_scores_kernel[grid](
        q, k, lse, out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        N, q.shape[1], w, n_rep, d, qk_scale,
        BLOCK_W=block_w, BLOCK_N=block_n, BLOCK_D=_pow2(d), WINDOW_MAX=reduce == "max", POOL=pool_size,
        POOL_MAX=pool_kind == "max", GQA_MAX=gqa == "max", DOT_F32=_dot_f32(q.dtype), **_launch_opts(q.device))
    return out


def window_scores_reference(queries: Tensor, keys: Tensor, n_rep: int, window: int | None = None,
                            scale: float | None = None, *, reduce: str = "sum", gqa: str = "mean",
                            pool=None) -> Tensor:
    """:func:`window_scores` from the reference stages
    (:func:`kvpolicy.exec.reference.scores.window_scores`, pure torch)."""
    _check_reductions(reduce, gqa, pool)
    return reference_window_scores(queries, keys, n_rep, window, scale, reduce=reduce, gqa=gqa, pool=pool)


# ---------------------------------------------------------------------------
# accumulated attention (H2O) and the causal attention output


@_kernel
def _causal_rows_kernel(Q, K, V, O, LSE,
                        stride_qh, stride_qn, stride_kh, stride_kn, stride_vh, stride_vn, stride_oh, stride_on,
                        T, N, n_rep, D, DV, qk_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, HAS_V: tl.constexpr, DOT_F32: tl.constexpr):
    """Pass 1: per query row ``i`` (position ``N - T + i``) the log-sum-exp
    (base 2) over keys ``j <= N - T + i`` into ``LSE [H, T]``; with ``HAS_V``
    also the attention output ``O [H, T, DV]`` (FlashAttention-2's forward).
    Grid: (query head, query block)."""
    h = tl.program_id(0)
    mb = tl.num_programs(1) - 1 - tl.program_id(1)  # the longest rows (most keys) start first
    g = h // n_rep
    offset = N - T
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    q = tl.load(Q + h.to(tl.int64) * stride_qh + i[:, None].to(tl.int64) * stride_qn + dd[None, :],
                mask=(i < T)[:, None] & (dd < D)[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = K + g.to(tl.int64) * stride_kh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    if HAS_V:
        dv = tl.arange(0, BLOCK_DV)
        v_base = V + g.to(tl.int64) * stride_vh
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # key 0 is in the first tile and every row sees it, so m is finite after it
    for n0 in range(0, offset + (mb + 1) * BLOCK_M, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + j[:, None].to(tl.int64) * stride_kn + dd[None, :],
                    mask=(j < N)[:, None] & (dd < D)[None, :], other=0.0)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="tf32x3")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where((j[None, :] <= offset + i[:, None]) & (j < N)[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        if HAS_V:
            v = tl.load(v_base + j[:, None].to(tl.int64) * stride_vn + dv[None, :],
                        mask=(j < N)[:, None] & (dv < DV)[None, :], other=0.0)
            if DOT_F32:
                pv = tl.dot(p, v.to(tl.float32), input_precision="tf32x3")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
        m = m_new
    tl.store(LSE + h.to(tl.int64) * T + i, m + tl.log2(l), mask=i < T)
    if HAS_V:
        o_ptr = O + h.to(tl.int64) * stride_oh + i[:, None].to(tl.int64) * stride_on + dv[None, :]
        tl.store(o_ptr, acc / l[:, None], mask=(i < T)[:, None] & (dv < DV)[None, :])


@_kernel
def _column_sums_kernel(Q, K, LSE, ACC,
                        stride_qh, stride_qn, stride_kh, stride_kn,
                        T, N, n_rep, D, qk_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_F32: tl.constexpr):
    """Pass 2: for one tile of keys ``j``, ``sum_i 2^(qk_scale * q_i.k_j - lse_i)``
    over the query rows that see them (``N - T + i >= j``), query tile by query
    tile from the first such row on, into ``ACC [H, N]``. Grid: (query head, key block)."""
    h = tl.program_id(0)
    nb = tl.program_id(1)
    g = h // n_rep
    offset = N - T
    j = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    k = tl.load(K + g.to(tl.int64) * stride_kh + j[:, None].to(tl.int64) * stride_kn + dd[None, :],
                mask=(j < N)[:, None] & (dd < D)[None, :], other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
    q_base = Q + h.to(tl.int64) * stride_qh
    col = tl.zeros([BLOCK_N], tl.float32)
    first = tl.maximum(nb * BLOCK_N - offset, 0)  # the first row that sees this tile's first key
    for m0 in range(first // BLOCK_M * BLOCK_M, T, BLOCK_M):
        i = m0 + tl.arange(0, BLOCK_M)
        q = tl.load(q_base + i[:, None].to(tl.int64) * stride_qn + dd[None, :],
                    mask=(i < T)[:, None] & (dd < D)[None, :], other=0.0)
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="tf32x3")
        else:
            s = tl.dot(q, tl.trans(k))
        lse = tl.load(LSE + h.to(tl.int64) * T + i, mask=i < T, other=0.0)
        visible = (j[None, :] <= offset + i[:, None]) & (i < T)[:, None]
        col += tl.sum(tl.exp2(tl.where(visible, s * qk_scale - lse[:, None], float("-inf"))), 0)
    tl.store(ACC + h.to(tl.int64) * N + j, col, mask=j < N)


def attention_with_column_sums(queries: Tensor, keys: Tensor, values: Tensor | None, n_rep: int,
                               block: int = 256, scale: float | None = None) -> tuple[Tensor | None, Tensor]:
    """Causal attention output ``[H, T, d_v]`` fp32 (when ``values`` are given)
    and the accumulated attention ``[H, N]`` fp32 from the same softmax rows; as
    :func:`kvpolicy.exec.reference.attention.attention_with_column_sums`.

    ``queries [H, T, d]`` are the last ``T`` of the ``N`` positions the keys
    ``[H_kv, N, d]`` (and values) cover: ``T = N`` for a whole prompt, ``T < N``
    for one chunk of a chunked prefill (its share of the sums).

    Pass 1 (one program per query tile, keys up to the diagonal) is a
    FlashAttention forward that also keeps each row's log-sum-exp; pass 2 (one
    program per key tile, queries from the diagonal on) sums the normalised
    probabilities down each key's column. Memory is ``O(H * N)`` besides the
    inputs; compute about twice a causal prefill's ``QK^T``. ``block`` bounds
    the tile edge (a power of two, at least 16; at most :data:`CAUSAL_BLOCK`).
    """
    H, T, d = queries.shape
    H_kv, N = keys.shape[:2]
    if keys.shape[2] != d or H != H_kv * n_rep:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} do not match n_rep={n_rep}")
    if T > N:
        raise ValueError(f"{T} queries but only {N} keys")
    if T == 0:
        return reference.attention_with_column_sums(queries, keys, values, n_rep, block, scale)
    if values is not None:
        if values.shape[:2] != (H_kv, N):
            raise ValueError(f"values {tuple(values.shape)} do not match keys {tuple(keys.shape)}")
        q, k, v = _prepare(queries, keys, values)
    else:
        q, k = _prepare(queries, keys)
        v = None
    qk_scale = (1.0 / math.sqrt(d) if scale is None else scale) * LOG2E
    tile = _tile(min(block, CAUSAL_BLOCK))
    lse = torch.empty(H, T, dtype=torch.float32, device=q.device)
    out = torch.empty(H, T, v.shape[-1], dtype=torch.float32, device=q.device) if v is not None else None
    d_v = v.shape[-1] if v is not None else 16
    vv, oo = (v, out) if v is not None else (k, lse)  # placeholders, never read without HAS_V
    opts = dict(BLOCK_M=tile, BLOCK_N=tile, BLOCK_D=_pow2(d), DOT_F32=_dot_f32(q.dtype), **_launch_opts(q.device))
    _causal_rows_kernel[(H, triton.cdiv(T, tile))](
        q, k, vv, oo, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        vv.stride(0), vv.stride(1), oo.stride(0), oo.stride(1),
        T, N, n_rep, d, d_v, qk_scale, BLOCK_DV=_pow2(d_v), HAS_V=v is not None, **opts)
    acc = torch.empty(H, N, dtype=torch.float32, device=q.device)
    _column_sums_kernel[(H, triton.cdiv(N, tile))](
        q, k, lse, acc, q.stride(0), q.stride(1), k.stride(0), k.stride(1), T, N, n_rep, d, qk_scale, **opts)
    return out, acc


def accumulated_attention(queries: Tensor, keys: Tensor, n_rep: int, block: int = 256) -> Tensor:
    """``s[h, j] = sum_{i >= j} softmax(q_i K^T / sqrt(d))[j]`` (H2O's
    accumulated attention, arXiv 2306.14048 §3); ``queries [H, N, d]`` (or the
    last ``T < N`` positions only: one prefill chunk's share), ``keys
    [H_kv, N, d]`` -> ``[H, N]`` fp32, as
    :func:`kvpolicy.exec.reference.attention.accumulated_attention`; see
    :func:`attention_with_column_sums` for the two passes and ``block``."""
    return attention_with_column_sums(queries, keys, None, n_rep, block=block)[1]



@_kernel
def _split_decode_kernel(Q, K, V, O, KEPT, SPLIT, END,
                         stride_qs, stride_qr, stride_ks, stride_km, stride_vs, stride_vm, stride_os, stride_or,
                         n_rep, D, DV, qk_scale, logit_cap,
                         BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DV: tl.constexpr, CAP: tl.constexpr):
    """One program per sequence ``s``: the ``n_rep`` query rows of its GQA
    group over key rows ``[0, KEPT[s])`` then ``[SPLIT[s], END[s])``, online
    softmax (base 2; ``qk_scale`` has ``log2(e)`` folded in), into ``O``.
    Every tile either loop enters holds at least one visible key (its first),
    so the running max is finite after the first tile."""
    s = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + s * stride_qs + r[:, None] * stride_qr + dd[None, :],
                mask=(r < n_rep)[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
    kept = tl.load(KEPT + s)
    split = tl.load(SPLIT + s)
    end = tl.load(END + s)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for part in tl.static_range(2):  # the kept prompt rows, then the decoded tokens
        start = 0 if part == 0 else split
        stop = kept if part == 0 else end
        n0 = start
        while n0 < stop:
            j = n0 + tl.arange(0, BLOCK_N)
            vis = j < stop
            k = tl.load(K + s * stride_ks + j[:, None].to(tl.int64) * stride_km + dd[None, :],
                        mask=vis[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
            logits = tl.dot(q, tl.trans(k), input_precision="tf32x3")
            if CAP:
                # cap * tanh(x / cap) in natural-log units, then to base 2
                x = logits * (qk_scale / 1.4426950408889634) / logit_cap
                logits = logit_cap * (2.0 * tl.sigmoid(2.0 * x) - 1.0) * 1.4426950408889634
            else:
                logits = logits * qk_scale
            logits = tl.where(vis[None, :], logits, float("-inf"))
            m_new = tl.maximum(m, tl.max(logits, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(logits - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(V + s * stride_vs + j[:, None].to(tl.int64) * stride_vm + dv[None, :],
                        mask=vis[:, None] & (dv < DV)[None, :], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="tf32x3")
            m = m_new
            n0 += BLOCK_N
    tl.store(O + s * stride_os + r[:, None] * stride_or + dv[None, :], acc / l[:, None],
             mask=(r < n_rep)[:, None] & (dv < DV)[None, :])


def split_decode_attention(queries: Tensor, keys: Tensor, values: Tensor, kept: Tensor, split: Tensor,
                           end: Tensor, scale: float, logit_cap: float = 0.0, block: int = 64) -> Tensor:
    """One decode step over two ranges of key rows per sequence, as
    :func:`kvpolicy.exec.reference.attention.split_decode_attention` (same
    arguments; ``[S, n_rep, d_v]`` fp32). One program per sequence; ``block``
    keys per tile (a power of two, at least 16)."""
    S, n_rep, d = queries.shape
    if keys.shape[0] != S or values.shape[:2] != keys.shape[:2] or keys.shape[2] != d:
        raise ValueError(f"queries {tuple(queries.shape)}, keys {tuple(keys.shape)} and values "
                         f"{tuple(values.shape)} do not match")
    if S == 0:
        return torch.empty(0, n_rep, values.shape[-1], dtype=torch.float32, device=queries.device)
    q, k, v = _prepare(queries, keys, values)
    bounds = [t.to(device=q.device, dtype=torch.int32).contiguous() for t in (kept, split, end)]
    d_v = v.shape[-1]
    out = torch.empty(S, n_rep, d_v, dtype=torch.float32, device=q.device)
    _split_decode_kernel[(S,)](
        q, k, v, out, *bounds, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), n_rep, d, d_v, scale * LOG2E, float(logit_cap),
        BLOCK_R=_pow2(n_rep), BLOCK_N=_tile(block), BLOCK_D=_pow2(d), BLOCK_DV=_pow2(d_v), CAP=logit_cap > 0,
        **_launch_opts(q.device))
    return out
