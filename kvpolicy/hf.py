"""Hooks into a Hugging Face transformers model's attention.

:func:`tap_attention` swaps in an attention function of ours for the duration
of a ``with`` block, through transformers' own ``AttentionInterface`` registry
(no monkeypatching of model code). The function sees each layer's queries
after RoPE and the full keys/values (cache included), which is what capture,
calibration and compression need.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Callable

import torch

_ids = itertools.count()


def base_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The attention the model would compute (SDPA), ``[B, q, H, d]`` out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


@contextmanager
def tap_attention(model, fn: Callable):
    """While active, every attention layer calls ``fn(module, query, key, value,
    attention_mask, scaling, **kwargs)`` (query ``[B, H, q, d]`` after RoPE,
    key/value ``[B, H_kv, kv, d]``); ``fn`` returns what the attention would
    (``(out [B, q, H, d], weights or None)``), e.g. by calling :func:`base_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    name = f"kvpolicy_tap_{next(_ids)}"
    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def attention_row(query, key, scaling: float, n_rep: int) -> torch.Tensor:
    """Softmax probabilities of single-token queries: ``[B, H, 1, d] x [B, H_kv, kv, d] -> [B, H, kv]`` fp32."""
    k = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key
    logits = torch.einsum("bhqd,bhkd->bhqk", query.float(), k.float()) * scaling
    return logits.softmax(dim=-1)[:, :, 0]
