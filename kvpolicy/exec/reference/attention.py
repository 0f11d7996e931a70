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
    H_kv = keys.shape[0]
    # the n_rep query heads of a KV head stacked into one matmul over its keys,
    # never the keys copied per query head (2.3 ms against 2.7 at 4k tokens,
    # 9 / 3 heads, 32 queries, 2 CPU cores)
    q = queries[:, W_cap - w:].float().reshape(H_kv, n_rep * w, d)
    logits = torch.bmm(q, keys.float().transpose(1, 2)).view(H, w, N)
    logits *= 1.0 / math.sqrt(d) if scale is None else scale
    q_pos = torch.arange(N - w, N, device=keys.device)[:, None]
    logits = logits.masked_fill(torch.arange(N, device=keys.device)[None, :] > q_pos, float("-inf"))
    return torch.softmax(logits, dim=-1)


def accumulated_attention(queries: Tensor, keys: Tensor, n_rep: int, block: int = 64) -> Tensor:
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
                               block: int = 64, scale: float | None = None) -> tuple[Tensor | None, Tensor]:
    """Causal attention output ``[H, T, d_v]`` fp32 (when ``values`` are given)
    and the accumulated attention ``[H, N]`` fp32 from the same softmax rows:
    one ``QK^T``, one softmax and one ``PV`` for both.

    ``queries [H, T, d]`` are the last ``T`` of the ``N`` positions the keys
    ``[H_kv, N, d]`` cover (``T = N`` for a whole prompt; ``T < N`` for one
    chunk of a chunked prefill, whose queries see the earlier chunks' keys),
    so the query at row ``i`` sits at position ``N - T + i``.

    During a prefill this replaces the model's own attention call (SGLang's
    ``torch_native`` backend, the transformers path's attention function).
    One KV head and ``block`` queries at a time, in fp32, never ``N x N``: the
    ``n_rep`` query heads of the KV head are stacked into one matrix of
    ``n_rep * block`` rows, so each tile is two matmuls over the keys it can
    see, a softmax, and a sum over the rows; only the diagonal
    ``block x block`` of a tile is masked. The output equals SDPA's to fp32
    rounding, not bit for bit.

    Measured on 2 CPU cores at 4096 tokens from the pool's layout, SmolLM2-135M's
    9 query / 3 KV heads, d = 64 (and a Llama-8B layer's 32 / 8, d = 128):
    0.18 s a layer (1.10 s) with one KV head and 64 queries a tile, against
    0.21 s (1.29 s) at 32 queries and 0.22 s (1.36 s) with all KV heads in one
    tile of 32; SDPA over the same rows takes 0.15 s (1.02 s); SDPA's flash
    kernel with its log-sum-exp followed by a second ``QK^T`` for the column
    sums (the one pass before this) took 0.30 s. The CPU backend runs the
    same tiles compiled, in SDPA's time (:mod:`kvpolicy.kernels.cpu`);
    ARCHITECTURE.md § Capture in one attention pass; ``bench/serve_prefill.py``
    measures the served prefill.
    """
    H, T, d = queries.shape
    H_kv, N = keys.shape[:2]
    if T > N:
        raise ValueError(f"{T} queries but only {N} keys")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    offset, device = N - T, keys.device
    q = (queries.float() * scale).contiguous().view(H_kv, n_rep, T, d)  # the scale folded into the queries
    # one copy into [H_kv, N, d] rows: the pool's gather gives [N, H_kv, d]
    # transposed, and a batched matmul over strided heads copies it each tile
    # (2x the time of the whole pass, measured in the server)
    keys_t = keys.float().contiguous().transpose(1, 2)  # [H_kv, d, N]
    v = values.float().contiguous() if values is not None else None
    acc = torch.zeros(H_kv, n_rep, N, dtype=torch.float32, device=device)
    out = torch.empty(H_kv, n_rep, T, v.shape[-1], dtype=torch.float32, device=device) if v is not None else None
    block = max(1, min(block, T))  # an empty chunk (T = 0) runs no tile
    logits_buf = torch.empty(n_rep * block * N, dtype=torch.float32, device=device)
    probs_buf = torch.empty_like(logits_buf)
    future = torch.ones(block, block, dtype=torch.bool, device=device).triu_(1)
    for h in range(H_kv):
        for start in range(0, T, block):
            stop = min(start + block, T)
            b, visible = stop - start, offset + stop
            logits = logits_buf[:n_rep * b * visible].view(n_rep * b, visible)
            torch.mm(q[h, :, start:stop].reshape(n_rep * b, d), keys_t[h, :, :visible], out=logits)
            logits.view(n_rep, b, visible)[..., offset + start:visible].masked_fill_(future[:b, :b], float("-inf"))
            probs = probs_buf[:n_rep * b * visible].view(n_rep * b, visible)
            torch.softmax(logits, dim=-1, out=probs)
            acc[h, :, :visible] += probs.view(n_rep, b, visible).sum(dim=1)
            if out is not None:
                out[h, :, start:stop] = torch.mm(probs, v[h, :visible]).view(n_rep, b, -1)
    return (out.view(H, T, v.shape[-1]) if out is not None else None), acc.view(H, N)


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
