"""A tiny random Llama and a byte-level tokenizer: real transformers code
paths, no download, seconds to run."""

from __future__ import annotations

import torch

from kvpolicy.hf.models import shape_of


class ByteTokenizer:
    """Bytes as tokens (ids 0-255), bos 256, eos 257: enough of the tokenizer
    interface for probes and greedy decoding."""

    bos_token_id = 256
    eos_token_id = 257

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_llama(num_layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      bos_token_id=256, eos_token_id=257)
    lm = LlamaForCausalLM(cfg).eval()
    lm.config._attn_implementation = "sdpa"
    return lm, ByteTokenizer(), shape_of(lm, "tiny-llama")
