"""The flattened-row layout that serves variable budgets in SGLang's pool
(:mod:`kvpolicy.sglang_ext.row_layout`), on plain tensors: no SGLang."""

from __future__ import annotations

import math

import pytest
import torch

from kvpolicy.exec.reference.attention import split_decode_attention
from kvpolicy.sglang_ext import row_layout as rl

S, L, H, d = 64, 3, 2, 8  # pool slots per layer, layers, KV heads, head dim


def pool(seed=0):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(S, H, d, generator=g) for _ in range(L)], [torch.randn(S, H, d, generator=g) for _ in range(L)])


def test_equal_budgets_are_the_rank_slot_layout():
    slots = torch.tensor([7, 3, 40, 12])
    lay = rl.assign(torch.full((L, H), 4), slots, S)
    assert lay.uniform and rl.slots_needed(lay.counts) == 4
    for lid in range(L):
        for h in range(H):
            assert lay.rows[lid][h].tolist() == [(lid * S + int(s)) * H + h for s in slots]


@pytest.mark.parametrize("counts", [[[5, 1], [9, 0], [2, 2]], [[1, 1], [1, 1], [1, 0]], [[20, 3], [0, 0], [0, 1]]])
def test_variable_budgets_pack_into_the_average(counts):
    counts = torch.tensor(counts)
    n = rl.slots_needed(counts)
    assert n == math.ceil(int(counts.sum()) / (L * H))  # the packing overhead is under one slot
    slots = torch.randperm(S)[:n]
    lay = rl.assign(counts, slots, S)
    assert not lay.uniform and lay.rows_per_layer == counts.sum(dim=1).tolist()
    rows = torch.cat([t[t >= 0] for t in lay.rows])
    assert rows.numel() == int(counts.sum()) and rows.unique().numel() == rows.numel()  # no row twice
    owner = (rows // H) % S
    assert torch.isin(owner, slots).all()  # every row is in one of the request's own slots
    with pytest.raises(ValueError, match="slots"):
        rl.assign(counts, torch.arange(n + 1), S)


def test_written_rows_read_back_and_nothing_else_changes():
    counts = torch.tensor([[5, 1], [9, 0], [2, 2]])
    keys, values = pool()
    before = [k.clone() for k in keys]
    slots = torch.tensor([10, 20, 30, 40])
    lay = rl.assign(counts, slots, S)
    g = torch.Generator().manual_seed(1)
    kept = [(torch.randn(H, 9, d, generator=g), torch.randn(H, 9, d, generator=g)) for _ in range(L)]
    rl.write(keys, values, lay, kept)
    readers = rl.readers(lay, S, "cpu")
    for lid in range(L):
        k = rl.gather(lambda i: keys[i], readers[lid], S)
        v = rl.gather(lambda i: values[i], readers[lid], S)
        for h in range(H):
            c = int(counts[lid, h])
            torch.testing.assert_close(k[h, :c], kept[lid][0][h, :c])
            torch.testing.assert_close(v[h, :c], kept[lid][1][h, :c])
    others = torch.ones(S, dtype=torch.bool)
    others[slots] = False
    for lid in range(L):
        assert torch.equal(keys[lid][others], before[lid][others])


def test_decode_reads_each_heads_rows_then_the_decoded_slots():
    """Against attention written out per head: softmax over that head's kept
    tokens followed by the request's decoded tokens in this layer."""
    counts = torch.tensor([[5, 1], [9, 0], [2, 2]])
    keys, values = pool(2)
    lay = rl.assign(counts, torch.tensor([10, 20, 30, 40]), S)
    g = torch.Generator().manual_seed(3)
    kept = [(torch.randn(H, 9, d, generator=g), torch.randn(H, 9, d, generator=g)) for _ in range(L)]
    rl.write(keys, values, lay, kept)
    decoded = torch.tensor([50, 51, 52])
    n_rep = 2
    q = torch.randn(H * n_rep, d, generator=g)
    for lid, reader in enumerate(rl.readers(lay, S, "cpu")):
        out = rl.decode_attention(q, lid, reader, decoded, lambda i: keys[i], lambda i: values[i], S, 0.3, 0.0,
                                  split_decode_attention)
        for qh in range(H * n_rep):
            h, c = qh // n_rep, int(counts[lid, qh // n_rep])
            k = torch.cat([kept[lid][0][h, :c], keys[lid][decoded, h]])
            v = torch.cat([kept[lid][1][h, :c], values[lid][decoded, h]])
            expected = torch.softmax(k @ q[qh] * 0.3, dim=0) @ v
            torch.testing.assert_close(out[qh], expected)


def test_a_layer_that_keeps_nothing_reads_only_the_decoded_slots():
    counts = torch.tensor([[3, 3], [0, 0], [3, 3]])
    keys, values = pool(4)
    lay = rl.assign(counts, torch.arange(rl.slots_needed(counts)), S)
    readers = rl.readers(lay, S, "cpu")
    assert rl.gather(lambda i: keys[i], readers[1], S).shape == (H, 0, d)
    q = torch.randn(H, d)
    out = rl.decode_attention(q, 1, readers[1], torch.tensor([60]), lambda i: keys[i], lambda i: values[i], S, 1.0,
                              0.0, split_decode_attention)
    torch.testing.assert_close(out, values[1][60])  # one visible key: its value, per head
