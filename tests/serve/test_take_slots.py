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
