"""Attention statistics the scores read: observation-window attention and
attention accumulated over the whole prompt, never as an N x N matrix.

Shapes: ``H`` query heads, ``H_kv`` KV heads, ``n_rep = H // H_kv`` (query
head ``h`` reads KV head ``h // n_rep``), ``N`` prompt tokens, ``W`` window
queries, ``d`` head dim. Keys and queries are after RoPE. Softmax in fp32 with
scale ``1 / sqrt(d)``, causal: the query at position ``i`` sees keys ``j <= i``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def expand_kv(x: Tensor, n_rep: int) -> Tensor:
    """``[H_kv, N, d] -> [H_kv * n_rep, N, d]`` with query head ``h`` reading KV head ``h // n_rep``."""
    return x.repeat_interleave(n_rep, dim=0) if n_rep > 1 else x


def window_attention(queries: Tensor, keys: Tensor, n_rep: int, window: int | None = None,
                     scale: float | None = None) -> Tensor:
    """Softmax rows of the last ``window`` prompt queries over all ``N`` keys.

    ``queries [H, W_cap, d]`` are the last ``W_cap`` prompt queries (positions
    ``N - W_cap .. N - 1``); ``window <= W_cap`` of them are used.
    Returns ``[H, window, N]`` fp32 probabilities (SnapKV, arXiv 2404.14469 eq. 1).
    ``scale`` defaults to ``1 / sqrt(d)``.
    """
    H, W_cap, d = queries.shape
    N = keys.shape[1]
    w = W_cap if window is None else window
    if not 1 <= w <= W_cap:
        raise ValueError(f"window {w} needs 1..{W_cap} captured queries")
    q = queries[:, W_cap - w:].float()
    k = expand_kv(keys, n_rep).float()
    logits = torch.einsum("hwd,hnd->hwn", q, k) * (1.0 / math.sqrt(d) if scale is None else scale)
    q_pos = torch.arange(N - w, N, device=keys.device)[:, None]
    logits = logits.masked_fill(torch.arange(N, device=keys.device)[None, :] > q_pos, float("-inf"))
    return torch.softmax(logits, dim=-1)


def accumulated_attention(queries: Tensor, keys: Tensor, n_rep: int, block: int = 256) -> Tensor:
    """``s[h, j] = sum_i softmax(q_i K^T / sqrt(d))[j]`` over all prompt queries
    ``i >= j`` (H2O's accumulated attention, arXiv 2306.14048 §3).

    ``queries [H, N, d]``, ``keys [H_kv, N, d]`` -> ``[H, N]`` fp32 (or the
    last ``T < N`` queries only: their share of the sum, as one chunk of a
    chunked prefill contributes it; see :func:`attention_with_column_sums`). Queries are
    taken ``block`` at a time against the keys they can see, so memory is
    ``H * block * N``, never ``N * N``.
    """
    return attention_with_column_sums(queries, keys, None, n_rep, block=block)[1]


def attention_with_column_sums(queries: Tensor, keys: Tensor, values: Tensor | None, n_rep: int,
                               block: int = 256, scale: float | None = None) -> tuple[Tensor | None, Tensor]:
    """Causal attention output ``[H, T, d]`` fp32 (when ``values`` are given)
    and the accumulated attention ``[H, N]`` fp32 from the same softmax rows.

    ``queries [H, T, d]`` are the last ``T`` of the ``N`` positions the keys
    ``[H_kv, N, d]`` cover (``T = N`` for a whole prompt; ``T < N`` for one
    chunk of a chunked prefill, whose queries see the earlier chunks' keys),
    so the query at row ``i`` sits at position ``N - T + i``.

    During a prefill this replaces the model's own attention call. On the CPU
    the output and each row's log-sum-exp come from the kernel SDPA itself
    runs there (so the output, cast back to the inputs' dtype, is
    bit-identical to the model's attention), and
    :func:`column_sums` adds the accumulated attention from that log-sum-exp
    with one more ``QK^T`` and no softmax; the Triton kernel
    (:func:`kvpolicy.kernels.attention.attention_with_column_sums`) has the
    same two passes. Elsewhere, block by block in fp32, ``block`` queries at
    a time, never ``N x N``.
    """
    H, T, d = queries.shape
    N = keys.shape[1]
    if T > N:
        raise ValueError(f"{T} queries but only {N} keys")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if values is not None and T and _fused_cpu(queries, keys, values):
        out, lse = causal_attention_lse(queries, keys, values, scale)
        return out.float(), column_sums(queries, keys, lse, n_rep, scale, min(block, 128))
    offset = N - T
    k = expand_kv(keys, n_rep).float()
    v = expand_kv(values, n_rep).float() if values is not None else None
    acc = torch.zeros(H, N, dtype=torch.float32, device=keys.device)
    out = torch.empty(H, T, v.shape[-1], dtype=torch.float32, device=keys.device) if v is not None else None
    for start in range(0, T, block):
        stop = min(start + block, T)
        visible = offset + stop
        q = queries[:, start:stop].float()
        logits = torch.einsum("hbd,hnd->hbn", q, k[:, :visible]) * scale
        q_pos = torch.arange(offset + start, visible, device=keys.device)[:, None]
        logits = logits.masked_fill(torch.arange(visible, device=keys.device)[None, :] > q_pos, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        acc[:, :visible] += probs.sum(dim=1)
        if out is not None:
            out[:, start:stop] = probs @ v[:, :visible]
    return out, acc


def _fused_cpu(queries: Tensor, keys: Tensor, values: Tensor) -> bool:
    """Whether SDPA's CPU flash kernel (with its log-sum-exp) takes these tensors."""
    return (queries.device.type == keys.device.type == values.device.type == "cpu"
            and queries.dtype == keys.dtype == values.dtype
            and queries.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and values.shape[-1] == queries.shape[-1]
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


def causal_attention_lse(queries: Tensor, keys: Tensor, values: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """SDPA's CPU flash kernel: the causal output ``[H, T, d]`` (in the
    queries' dtype) and each query's log-sum-exp ``[H, T]`` fp32 of its
    scaled logits. The kernel aligns the causal mask top-left, so a chunk
    (``T < N``) is run as SGLang's ``torch_native`` backend runs it: its
    queries placed at the end of an ``N``-row block, the rows before unused."""
    H, T, d = queries.shape
    N = keys.shape[1]
    q = queries
    if T < N:
        q = queries.new_zeros(H, N, d)
        q[:, N - T:] = queries
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None], keys[None], values[None], 0.0, True, scale=scale)[:2]
    return out[0, :, N - T:], lse[0, :, N - T:]


def column_sums(queries: Tensor, keys: Tensor, lse: Tensor, n_rep: int, scale: float, block: int = 128,
                key_block: int = 512) -> Tensor:
    """``s[h, j] = sum_i exp(scale * q_i . k_j - lse_i)`` over the causal rows
    ``i >= j``: the accumulated attention given each row's log-sum-exp
    ``lse [H, T]`` (from the attention pass). ``queries [H, T, d]`` are the
    last ``T`` of the ``N`` key positions. The query heads of one KV head are
    taken together (no repeated keys), in tiles of ``block`` rows by
    ``key_block`` keys, fp32: on 2 CPU cores at 4k tokens the tiles cost
    0.13 s a layer against 0.20 s for whole rows of keys (small enough to
    stay in cache; measured with SmolLM2's 9 query / 3 KV heads, d = 64)."""
    H, T, d = queries.shape
    H_kv, N = keys.shape[:2]
    offset = N - T
    keys_t = keys.float().transpose(1, 2)
    acc = torch.zeros(H_kv, n_rep, N, dtype=torch.float32, device=keys.device)
    for start in range(0, T, block):
        stop = min(start + block, T)
        b, first = stop - start, offset + start  # rows, the position of the first
        q = queries[:, start:stop].float().reshape(H_kv, n_rep * b, d)
        shift = lse[:, start:stop].float().reshape(H_kv, n_rep * b, 1)
        for k0 in range(0, first + b, key_block):
            k1 = min(k0 + key_block, first + b)
            logits = torch.baddbmm(shift, q, keys_t[:, :, k0:k1], beta=-1.0, alpha=scale).view(H_kv, n_rep, b, k1 - k0)
            if k1 > first + 1:  # the tile crosses the diagonal
                future = (torch.arange(k0, k1, device=keys.device)[None, :]
                          > torch.arange(first, first + b, device=keys.device)[:, None])
                logits.masked_fill_(future, float("-inf"))
            acc[..., k0:k1] += logits.exp_().sum(dim=2)
    return acc.reshape(H, N)


def split_decode_attention(queries: Tensor, keys: Tensor, values: Tensor, kept: Tensor, split: Tensor,
                           end: Tensor, scale: float, logit_cap: float = 0.0) -> Tensor:
    """One decode step of attention for sequences that each read two ranges of
    their own key rows: a KV head's kept prompt tokens and its decoded tokens.

    How a compressed request is read when its KV heads keep different numbers
    of tokens (ARCHITECTURE.md § Variable budgets): one sequence per
    (request, KV head), its ``kept[s]`` prompt rows first (padding after
    them), then from ``split[s]`` the ``end[s] - split[s]`` tokens decoded
    since compression.

    ``queries [S, n_rep, d]`` (the query heads of sequence ``s``'s GQA group),
    ``keys [S, M, d]``, ``values [S, M, d_v]``; sequence ``s`` reads positions
    ``[0, kept[s])`` and ``[split[s], end[s])``. Softmax in fp32 with
    ``scale``; ``logit_cap > 0`` applies ``cap * tanh(logit / cap)`` (Gemma-style
    soft capping, as SGLang's backends do). Returns ``[S, n_rep, d_v]`` fp32.
    """
    M = keys.shape[1]
    pos = torch.arange(M, device=keys.device)[None, :]
    visible = (pos < kept[:, None]) | ((pos >= split[:, None]) & (pos < end[:, None]))  # [S, M]
    logits = torch.einsum("srd,smd->srm", queries.float(), keys.float()) * scale
    if logit_cap > 0:
        logits = logit_cap * torch.tanh(logits / logit_cap)
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    return torch.einsum("srm,smd->srd", torch.softmax(logits, dim=-1), values.float())
