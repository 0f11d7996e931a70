"""The only code that touches SGLang's allocator, ``req_to_token`` and the
radix tree: reading a request's slots, taking fresh slots for its compressed
copy, writing it there, and giving up the request's hold on its exact prompt
(ARCHITECTURE.md § Where compressed KV lives in SGLang, and § What the plugin
reads and writes in SGLang).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpolicy.sglang_ext import row_layout


class NotCompressed(Exception):
    """The request keeps its exact KV (logged and counted, never silent);
    ``reason`` is its label in :data:`kvpolicy.sglang_ext.metrics.LEFT_EXACT`."""

    def __init__(self, message: str, reason: str = "capture_incomplete"):
        super().__init__(message)
        self.reason = reason


def request_slots(req_to_token_pool, row, start: int, stop: int) -> torch.Tensor:
    """The pool slots of tokens ``[start, stop)`` of the request in ``row``."""
    return req_to_token_pool.req_to_token[row, start:stop].to(torch.long)


def read_prompt(kv, lid: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``lid``'s keys and values at ``slots``, ``[H_kv, N, d]`` each."""
    return kv.get_key_buffer(lid)[slots].transpose(0, 1), kv.get_value_buffer(lid)[slots].transpose(0, 1)


@dataclass
class Installed:
    """Where a request's compressed copy went."""

    slots: torch.Tensor  # the B slots it now holds
    layout: row_layout.RowLayout
    rank_slot: bool  # every layer and head keeps B tokens: SGLang's own attention reads it
    slots_freed: int  # of its exact prompt, returned to the allocator
    slots_released_to_tree: int  # of its exact prompt, still cached by the tree, now evictable
    released_own_prompt: bool  # the hold was released first, to find room in a full pool
    skip_radix_cache_insert: bool  # the request's own flag before


def install(tree, batch, i: int, req, old: torch.Tensor, kept: list, counts: torch.Tensor,
            pool_slots: int, running: tuple | None = None, decode: bool = False) -> Installed:
    """Write a request's compressed layers (``kept[l] = (keys, values)``
    ``[H_kv, K, d]``, head ``h``'s first ``counts[l, h]`` valid) into fresh
    slots and point the request at them; ``old`` are its ``N`` exact slots;
    row ``i`` of the prefill ``batch`` is the request's.

    With the overlap scheduler the request is already in the running batch
    (``running = (batch, j)``) when its prefill result is processed, and may
    have its first decode step prepared there (``decode``: a slot at
    position ``N``): that slot moves to position ``B`` and the running row's
    length to ``B + 1`` (``B`` when no step was prepared), so the step writes
    and reads the compressed request.

    Until the slots are written nothing about the request has changed, so a
    failure before (:class:`NotCompressed`) leaves it exact."""
    allocator = tree.token_to_kv_pool_allocator
    kv = allocator.get_kvcache()
    B = row_layout.slots_needed(counts)
    uniform = row_layout.is_rank_slot(counts)
    if not uniform and getattr(kv, "store_dtype", kv.dtype) != kv.dtype:
        raise NotCompressed(f"the KV cache is stored as {kv.store_dtype}: the row layout needs it unquantised",
                            "error")
    # Give up the hold on the N uncompressed slots: [0, protected) belong to
    # the tree (unlocked: evictable, still exact cache); the rest were the
    # request's own and go back to the allocator. Normally after the B new
    # slots are written; under memory pressure first, to make room for them.
    protected = req.kv.cache_protected_len
    owned = old[protected:]
    new, released = take_slots(tree, allocator, req, B, owned)
    layout = row_layout.assign(counts, new, pool_slots)
    if uniform:
        for lid, (k, v) in enumerate(kept):  # slot j <- every head's j-th kept token
            kv.set_kv_buffer(None, new, k[:, :B].transpose(0, 1).contiguous(), v[:, :B].transpose(0, 1).contiguous(),
                             layer_id_override=lid)
    else:
        layers = range(len(kept))
        row_layout.write([kv.get_key_buffer(i) for i in layers], [kv.get_value_buffer(i) for i in layers],
                         layout, kept)
    req_to_token = tree.req_to_token_pool.req_to_token
    row = req.kv.req_pool_idx
    N = old.numel()
    if decode:
        req_to_token[row, B] = req_to_token[row, N].clone()
    req_to_token[row, :B] = new.to(req_to_token.dtype)
    if not released:
        release_hold(tree, allocator, req, owned)
    req.kv.cache_protected_len = 0
    req.kv.kv_committed_len = req.kv.kv_allocated_len = B + decode
    skip = req.skip_radix_cache_insert
    req.skip_radix_cache_insert = True
    _set_length(batch, i, B)
    if running is not None:
        _set_length(*running, B + decode)
    return Installed(new, layout, uniform, int(owned.numel()), int(protected), released, skip)


def _set_length(batch, i: int, n: int) -> None:
    """Row ``i`` of a ScheduleBatch now holds ``n`` tokens (the overlap
    scheduler's copy of a prefill batch carries no lengths). ``orig_seq_lens``
    (read by CUDA-graph runners only) is left as SGLang set it, in both modes."""
    for name in ("seq_lens", "seq_lens_cpu"):
        lens = getattr(batch, name, None)
        if lens is not None:
            lens[i] = n
    batch.seq_lens_sum = None


def release_hold(tree, allocator, req, owned: torch.Tensor) -> None:
    """The request stops holding its uncompressed prompt: the slots it owns
    alone go back to the allocator, its lock on the tree path is released
    (those slots stay cached, now evictable)."""
    if owned.numel():
        allocator.free(owned)
    if req.lock is not None:  # None once compressed: a recompression holds nothing in the tree
        tree.unlock(req.lock)
    req.lock = None


def take_slots(tree, allocator, req, B: int, owned: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``B`` free slots for a request's compressed copy, and whether its hold
    on the uncompressed prompt was released to find them.

    Free slots and the tree's evictable ones come first. When they fall short
    (a full pool: the prompt the request holds is what fills it), the hold is
    released first, so the ``N > B`` slots it frees or makes evictable make
    room. If even that is not enough, the lock is taken back before anything
    was evicted, and the request keeps its exact KV (:class:`NotCompressed`).
    Page size 1 (checked at launch): any ``B`` slots will do.
    """
    from sglang.srt.mem_cache.common import evict_from_tree_cache

    released = False
    if allocator.available_size() + tree.evictable_size() < B:
        node = req.lock.node if req.lock is not None else None
        if req.lock is not None:
            tree.unlock(req.lock)
        req.lock = None
        if allocator.available_size() + tree.evictable_size() + owned.numel() < B:
            if node is not None:
                req.lock = tree.lock(node)
            raise NotCompressed(f"no room for {B} slots even after releasing its own prompt", "no_room")
        if owned.numel():
            allocator.free(owned)
        released = True
    evict_from_tree_cache(tree, B)
    new = allocator.alloc(B)
    if new is None:  # free + evictable >= B was checked just above
        raise RuntimeError(f"the allocator refused {B} slots with {allocator.available_size()} free")
    return new, released
