"""Rank-slot compaction of a paged KV pool: the torch reference against the
definition (read everything, then write), and the Triton kernels against the
reference, bit for bit (they only move data; the buffers hold random bits,
NaN payloads and signed zeros included).

Batches are varlen: several requests of different lengths and budgets whose
slots are scattered over the pool; every head keeps its own tokens in its own
order, and the destinations are each request's first ``B_r`` slots, so sources
and destinations overlap (``test_the_batches_overlap`` shows that a naive
in-place copy gets them wrong).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # before triton is first imported (also done by conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import triton  # noqa: F401 - without Triton this module fails to import, loudly

from kvpolicy.kernels import compact as kcompact
from kvpolicy.reference import compact as rcompact

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def pool(S, H, d, dtype, seed):
    """``[S, H, d]`` of random bits (every pattern: NaNs with payloads, infinities, -0.0)."""
    g = torch.Generator().manual_seed(seed)
    bits = BITS[dtype]
    info = torch.iinfo(bits)
    return torch.randint(info.min, info.max, (S, H, d), generator=g, dtype=torch.int64).to(bits).view(dtype)


def batch(S, H, lengths, budgets, seed):
    """``src_slots [total_B, H]``, ``cu_budgets``, ``dst_slots``: request ``r``
    owns ``lengths[r]`` random pool slots (in its token order); each head keeps
    ``budgets[r]`` of them in a random rank order; the request's first
    ``budgets[r]`` slots receive them."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(S, generator=g)
    src, dst, start = [], [], 0
    for n, b in zip(lengths, budgets, strict=True):
        own = free[start:start + n]
        start += n
        src.append(torch.stack([own[torch.randperm(n, generator=g)[:b]] for _ in range(H)], dim=1))
        dst.append(own[:b])
    cu = torch.tensor([0, *torch.tensor(budgets).cumsum(0).tolist()])
    return torch.cat(src), cu, torch.cat(dst)


def moved(buffer, src, dst):
    """The definition: every row read from the original buffer, then written."""
    out = buffer.clone()
    for i in range(len(dst)):
        for h in range(buffer.shape[1]):
            out[dst[i], h] = buffer[src[i, h], h]
    return out


def same_bits(a, b):
    return torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


# --------------------------------------------------------------------------- reference


def test_reference_on_a_hand_made_batch():
    # pool of 6 slots, 2 heads, d=1; one request owning slots 4, 1, 5 keeps 2 tokens:
    # head 0 keeps the tokens in slots 5 then 4; head 1 the tokens in slots 1 then 5
    k = torch.arange(12.0).view(6, 2, 1)  # k[s, h] = 2 s + h
    v = -k
    src, cu, dst = torch.tensor([[5, 1], [4, 5]]), torch.tensor([0, 2]), torch.tensor([4, 1])
    rcompact.compact(k, v, src, cu, dst)
    assert k[4].flatten().tolist() == [10.0, 3.0] and k[1].flatten().tolist() == [8.0, 11.0]
    assert torch.equal(v, -k)
    untouched = [0, 2, 3, 5]
    assert torch.equal(k[untouched], torch.arange(12.0).view(6, 2, 1)[untouched])


def test_the_batches_overlap():
    k = pool(64, 3, 4, torch.float32, seed=0)
    src, _, dst = batch(64, 3, [20, 13, 9], [20, 5, 7], seed=0)  # request 0 keeps all: a permutation
    naive = k.clone()
    for i in range(len(dst)):
        for h in range(3):
            naive[dst[i], h] = naive[src[i, h], h]
    assert not same_bits(naive, moved(k, src, dst))


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_moves_like_the_definition(seed):
    S, H = 80, 4
    k, v = pool(S, H, 8, torch.float16, seed), pool(S, H, 6, torch.float16, seed + 10)
    src, cu, dst = batch(S, H, [25, 11, 30], [25, 4, 12], seed)
    want_k, want_v = moved(k, src, dst), moved(v, src, dst)
    rcompact.compact(k, v, src, cu, dst)
    assert same_bits(k, want_k) and same_bits(v, want_v)


@pytest.mark.parametrize("cu, src, dst, message", [
    ([0, 3], [[0, 1]] * 2, [0, 1], "cu_budgets"),
    ([1, 2], [[0, 1]] * 2, [0, 1], "cu_budgets"),
    ([0, 2, 1, 2], [[0, 1]] * 2, [0, 1], "cu_budgets"),
    ([0, 2], [[0, 9]] * 2, [0, 1], "src_slots"),
    ([0, 2], [[0, 1]] * 2, [0, -1], "dst_slots"),
    ([0, 2], [[0, 1]] * 2, [3, 3], "repeats"),
    ([0, 2], [[0, 1, 2]] * 2, [0, 1], "src_slots must be"),
])
def test_reference_rejects_a_bad_batch(cu, src, dst, message):
    k = torch.zeros(8, 2, 4)
    with pytest.raises(ValueError, match=message):
        rcompact.compact(k, k.clone(), torch.tensor(src), torch.tensor(cu), torch.tensor(dst))


# --------------------------------------------------------------------------- kernels


# (H_kv, d_k, d_v, dtype, lengths, budgets): GQA head counts, d 64/128 (and a
# different value dim), every dtype; requests of different B, full permutations
# (B = N) among them, a single request, a request keeping one token
COMPACT = [
    (2, 64, 64, torch.float32, [30, 17, 25], [30, 5, 11]),
    (3, 128, 128, torch.float16, [40], [40]),
    (4, 64, 64, torch.bfloat16, [12, 33, 20, 9], [3, 10, 20, 1]),
    (8, 128, 128, torch.bfloat16, [21, 16], [7, 16]),
    (8, 64, 128, torch.float16, [26, 14, 10], [9, 14, 2]),
    (4, 128, 64, torch.float32, [50, 5], [13, 5]),
]


@pytest.mark.parametrize("H, dk, dv, dtype, lengths, budgets", COMPACT)
def test_compact_kernel_is_bit_identical_to_the_reference(H, dk, dv, dtype, lengths, budgets):
    S = sum(lengths) + 17  # slots no request owns stay untouched
    k, v = pool(S, H, dk, dtype, seed=H), pool(S, H, dv, dtype, seed=H + 1)
    src, cu, dst = batch(S, H, lengths, budgets, seed=dk + H)
    want_k, want_v = k.clone(), v.clone()
    rcompact.compact(want_k, want_v, src, cu, dst)
    assert same_bits(want_k, moved(k, src, dst))
    got_k, got_v = k.to(DEVICE, copy=True), v.to(DEVICE, copy=True)
    kcompact.compact(got_k, got_v, src.to(DEVICE), cu.to(DEVICE), dst.to(DEVICE))
    assert same_bits(got_k.cpu(), want_k) and same_bits(got_v.cpu(), want_v)


def test_compact_kernel_takes_int32_slots_and_a_strided_pool():
    # a layer's view of a [S, 2 layers, H, d] allocation: slot stride 2 H d
    S, H, d = 60, 3, 64
    whole_k, whole_v = pool(S, 2 * H, d, torch.float16, 3).view(S, 2, H, d), pool(S, 2 * H, d, torch.float16, 4)
    whole_v = whole_v.view(S, 2, H, d)
    src, cu, dst = batch(S, H, [30, 20], [10, 20], seed=5)
    want_k, want_v = whole_k.clone(), whole_v.clone()
    rcompact.compact(want_k[:, 1], want_v[:, 1], src, cu, dst)
    got_k, got_v = whole_k.to(DEVICE, copy=True), whole_v.to(DEVICE, copy=True)
    kcompact.compact(got_k[:, 1], got_v[:, 1], src.int().to(DEVICE), cu.int().to(DEVICE), dst.int().to(DEVICE))
    assert same_bits(got_k.cpu(), want_k) and same_bits(got_v.cpu(), want_v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_slots_kernel_is_bit_identical_to_the_reference(dtype):
    S, H, d, total = 50, 4, 64, 19
    k, v = pool(S, H, d, dtype, 7), pool(S, H, d, dtype, 8)
    rows_k, rows_v = pool(total, H, d, dtype, 9), pool(total, H, d, dtype, 10)
    dst = torch.randperm(S, generator=torch.Generator().manual_seed(0))[:total]
    want_k, want_v = k.clone(), v.clone()
    rcompact.write_slots(want_k, want_v, dst, rows_k, rows_v)
    got_k, got_v = k.to(DEVICE, copy=True), v.to(DEVICE, copy=True)
    kcompact.write_slots(got_k, got_v, dst.to(DEVICE), rows_k.to(DEVICE), rows_v.to(DEVICE))
    assert same_bits(got_k.cpu(), want_k) and same_bits(got_v.cpu(), want_v)
    assert same_bits(want_k[dst], rows_k) and not same_bits(want_k, k)


def test_an_empty_batch_changes_nothing():
    k, v = pool(10, 2, 64, torch.float16, 0).to(DEVICE), pool(10, 2, 64, torch.float16, 1).to(DEVICE)
    k0, v0 = k.clone(), v.clone()
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    kcompact.compact(k, v, empty.view(0, 2), torch.zeros(1, dtype=torch.long, device=DEVICE), empty)
    assert same_bits(k, k0) and same_bits(v, v0)


def test_the_kernels_reject_mismatched_shapes():
    k = torch.zeros(8, 2, 64, device=DEVICE)
    src, cu, dst = (torch.zeros(3, 2, dtype=torch.long, device=DEVICE), torch.tensor([0, 3], device=DEVICE),
                    torch.arange(3, device=DEVICE))
    with pytest.raises(ValueError, match="src_slots must be"):
        kcompact.compact(k, k.clone(), src[:, :1], cu, dst)
    with pytest.raises(ValueError, match="k_buffer/v_buffer"):
        kcompact.compact(k, torch.zeros(8, 3, 64, device=DEVICE), src, cu, dst)
    with pytest.raises(ValueError, match="dtype"):
        kcompact.write_slots(k, k.clone(), dst, torch.zeros(3, 2, 64, dtype=torch.float16, device=DEVICE),
                             torch.zeros(3, 2, 64, device=DEVICE))


def test_the_kernel_modules_import_without_triton_and_fail_when_called():
    code = """
import sys
sys.modules["triton"] = None  # as if Triton were not installed
import torch
from kvpolicy.kernels import compact, merge, select
for call in (lambda: select.top_c(torch.zeros(1, 4), torch.ones(4, dtype=torch.bool), 2),
             lambda: merge.scatter(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), None),
             lambda: compact.write_slots(torch.zeros(4, 1, 8), torch.zeros(4, 1, 8), torch.zeros(0, dtype=torch.long),
                                         torch.zeros(0, 1, 8), torch.zeros(0, 1, 8))):
    try:
        call()
    except ImportError as e:
        assert "needs Triton" in str(e), e
    else:
        raise AssertionError("a kernel ran without Triton")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
