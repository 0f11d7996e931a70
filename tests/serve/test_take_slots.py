"""Room for a compressed copy in a full pool (``pool.take_slots``), on a
stand-in allocator and tree that count slots the way SGLang's do."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvpolicy.sglang_ext.pool import NotCompressed, take_slots


@dataclass
class Lock:
    node: int  # slots on the locked path that only this holder protects


class Tree:
    def __init__(self, allocator, evictable: int):
        self.token_to_kv_pool_allocator = allocator
        self.evictable = evictable

    def supports_prefix_sharing(self):
        return True

    def evictable_size(self):
        return self.evictable

    def unlock(self, lock):
        if lock is not None:
            self.evictable += lock.node

    def lock(self, node):
        self.evictable -= node
        return Lock(node)


class Allocator:
    def __init__(self, free: int):
        self.free_slots = free

    def available_size(self):
        return self.free_slots

    def alloc(self, n):
        if n > self.free_slots:
            return None
        self.free_slots -= n
        return torch.arange(n)

    def free(self, slots):
        self.free_slots += slots.numel()

    def evict_to_free_tokens(self, tree, n):
        take = min(max(n - self.free_slots, 0), tree.evictable)
        tree.evictable -= take
        self.free_slots += take


@dataclass
class Req:
    lock: Lock | None


def setup(free, evictable, prompt_in_tree):
    allocator = Allocator(free)
    return Tree(allocator, evictable), allocator, Req(Lock(prompt_in_tree))


def test_free_and_evictable_slots_come_first():
    tree, allocator, req = setup(free=50, evictable=30, prompt_in_tree=400)
    new, released = take_slots(tree, allocator, req, 64, torch.arange(0))
    assert new.numel() == 64 and not released
    assert req.lock == Lock(400)  # still held: released after the copy is written
    assert allocator.free_slots == 0 and tree.evictable == 16


@pytest.mark.parametrize("prompt_in_tree, owned", [(400, 0), (300, 100)])
def test_a_full_pool_makes_room_from_the_requests_own_prompt(prompt_in_tree, owned):
    tree, allocator, req = setup(free=10, evictable=20, prompt_in_tree=prompt_in_tree)
    new, released = take_slots(tree, allocator, req, 64, torch.arange(owned))
    assert new.numel() == 64 and released and req.lock is None
    # every slot is accounted for: free + evictable + the new copy
    assert allocator.free_slots + tree.evictable + 64 == 10 + 20 + prompt_in_tree + owned


def test_no_room_at_all_keeps_the_request_exact_and_locked():
    tree, allocator, req = setup(free=5, evictable=0, prompt_in_tree=30)
    with pytest.raises(NotCompressed, match="no room for 64 slots"):
        take_slots(tree, allocator, req, 64, torch.arange(10))
    assert req.lock == Lock(30) and tree.evictable == 0 and allocator.free_slots == 5


class KV:
    """A KV pool of ``S`` slots, one KV head, head dim 1: what install writes."""

    dtype = store_dtype = torch.float32

    def __init__(self, S):
        self.k, self.v = torch.zeros(S, 1, 1), torch.zeros(S, 1, 1)

    def set_kv_buffer(self, layer, loc, k, v, layer_id_override=None):
        self.k[loc], self.v[loc] = k, v


class PoolAllocator(Allocator):
    def __init__(self, free_ids, kv):
        super().__init__(len(free_ids))
        self.ids, self.kv, self.freed = list(free_ids), kv, []

    def alloc(self, n):
        out, self.ids = torch.tensor(self.ids[:n]), self.ids[n:]
        self.free_slots -= n
        return out

    def free(self, slots):
        super().free(slots)
        self.freed += slots.tolist()

    def get_kvcache(self):
        return self.kv


def test_install_moves_the_first_decode_step_the_overlap_scheduler_prepared():
    """With the overlap scheduler a request's first decode step is prepared
    (a slot at position N, running-batch length N + 1) before compression:
    install moves that slot to position B and the running row to B + 1, and
    leaves the prefill batch's copy (which carries no lengths) alone."""
    from types import SimpleNamespace

    from kvpolicy.sglang_ext.pool import install

    N, B, decode_slot = 6, 2, 16
    kv = KV(32)
    allocator = PoolAllocator([20, 21, 22], kv)
    tree = Tree(allocator, evictable=0)
    table = torch.zeros(1, 40, dtype=torch.int32)
    table[0, :N] = torch.arange(10, 10 + N)
    table[0, N] = decode_slot
    tree.req_to_token_pool = SimpleNamespace(req_to_token=table)
    req = SimpleNamespace(lock=Lock(0), skip_radix_cache_insert=False,
                          kv=SimpleNamespace(req_pool_idx=0, cache_protected_len=0, kv_committed_len=N + 1,
                                             kv_allocated_len=N + 1))
    copy = SimpleNamespace(seq_lens=None, seq_lens_cpu=None, seq_lens_sum=None)
    running = SimpleNamespace(seq_lens=torch.tensor([N + 1]), seq_lens_cpu=torch.tensor([N + 1]), seq_lens_sum=9)
    kept = [(torch.tensor([[[1.0], [2.0]]]), torch.tensor([[[3.0], [4.0]]]))]  # one layer, one head, B tokens
    done = install(tree, copy, 0, req, table[0, :N].long(), kept, torch.tensor([[B]]), 32, (running, 0), True)
    assert table[0, :B + 1].tolist() == [20, 21, decode_slot]
    assert req.kv.kv_allocated_len == req.kv.kv_committed_len == B + 1
    assert running.seq_lens.tolist() == running.seq_lens_cpu.tolist() == [B + 1] and running.seq_lens_sum is None
    assert copy.seq_lens is None
    assert sorted(allocator.freed) == list(range(10, 10 + N))  # its own exact prompt, not the decode slot
    assert kv.k[[20, 21]].flatten().tolist() == [1.0, 2.0] and done.slots.tolist() == [20, 21]
