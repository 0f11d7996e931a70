"""Triton top-c selection, class assignment and merge scatter against the
reference stages (kvpolicy.exec.reference.select / merge).

Without a GPU these run in Triton's interpreter at small sizes; without Triton
the module fails to import (loudly, never a skip).

Tolerances and why:

* ``pick``: exact. Kernel and reference order the same values (fp16/bf16
  scores widen to fp32 exactly) by the same rule, so positions, order and
  counts must be identical, ties included.
* ``classify``: class ids, weights, counts exact. Both compute similarities in
  fp32 from the same inputs but sum in different orders (last-bit
  differences), so the inputs are built with every not-kept token far from the
  threshold and, when it merges, with one clearly best centre (checked in
  float64 before comparing; a test whose data came too close fails rather than
  passes vacuously).
* ``scatter``: both accumulate in fp32; float atomics change the summation
  order, so fp32 results agree to ``1e-5``. fp16/bf16 outputs are one rounding
  of those fp32 values, which may land one ulp apart: ``rtol = atol = 1e-3``
  (fp16, ulp 2^-10 relative) and ``1e-2`` (bf16, ulp 2^-7). Slots that absorb
  nothing must be bit-identical in every dtype.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # before triton is first imported (also done by conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import triton  # noqa: F401 - without Triton this module fails to import, loudly

from kvpolicy.exec.reference import merge as rmerge
from kvpolicy.exec.reference import select as rselect
from kvpolicy.kernels import merge as kmerge
from kvpolicy.kernels import select as kselect
from kvpolicy.lang import ir

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCATTER_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-3),
               torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
HEAD = ir.Selection("head", ir.KeepTop("s"))


def reference_top(scores, candidates, c):
    return rselect._ranked(scores, candidates)[:, :c]


def test_kernels_run_in_the_mode_this_machine_needs():
    mode = type(kselect._threshold_kernel).__name__
    assert mode == ("JITFunction" if DEVICE == "cuda" else "InterpretedFunction")


# --------------------------------------------------------------------------- top-c


# (H_kv, N, c, block): GQA-relevant head counts; N never a multiple of the block
TOP_SHAPES = [(2, 37, 5, 16), (3, 300, 41, 64), (4, 1000, 100, 1024), (8, 523, 60, 256), (8, 150, 1, 64)]


@pytest.mark.parametrize("H, N, c, block", TOP_SHAPES)
def test_top_c_equals_the_reference_order_without_ties(H, N, c, block):
    g = torch.Generator().manual_seed(N)
    scores = torch.randn(H, N, generator=g)
    assert all(row.unique().numel() == N for row in scores)  # no ties
    candidates = rselect.protected_mask(N, ir.Protect(sink=3, recent=7)).logical_not()
    got = kselect.top_c(scores.to(DEVICE), candidates.to(DEVICE), c, block=block).cpu()
    assert torch.equal(got, reference_top(scores, candidates, c))


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_c_per_dtype(dtype):
    # distinct values exact in every dtype (integers up to 256), negative ones included
    H, N, c = 3, 250, 37
    g = torch.Generator().manual_seed(1)
    scores = torch.stack([torch.randperm(N, generator=g) - 100 for _ in range(H)]).to(dtype) / 8
    candidates = torch.rand(H, N, generator=g) > 0.3  # a per-head mask
    got = kselect.top_c(scores.to(DEVICE), candidates.to(DEVICE), c, block=64).cpu()
    assert torch.equal(got, reference_top(scores, candidates, c))


def test_ties_go_to_the_earlier_position():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    got = kselect.top_c(scores.to(DEVICE), torch.ones(6, dtype=torch.bool, device=DEVICE), 4).cpu()
    assert got.tolist() == [[1, 2, 4, 3], [0, 1, 2, 3]]


def test_ties_signed_zeros_infinities_and_nan_follow_torch_sort():
    g = torch.Generator().manual_seed(2)
    negative_nan = torch.tensor([-(1 << 22)], dtype=torch.int32).view(torch.float32)  # bits 0xFFC00000
    values = torch.cat([torch.tensor([-1.0, 0.0, -0.0, 2.0, float("inf"), float("-inf"), float("nan"), 2.0]),
                        negative_nan])
    H, N = 3, 200
    scores = values[torch.randint(0, len(values), (H, N), generator=g)]
    candidates = torch.rand(N, generator=g) > 0.2  # non-candidates tie with candidates at -inf
    for c in (1, 17, 120, N):  # cuts inside tie groups, and past the candidates
        got = kselect.top_c(scores.to(DEVICE), candidates.to(DEVICE), c, block=64).cpu()
        assert torch.equal(got, reference_top(scores, candidates, c)), c


@pytest.mark.parametrize("selection", [
    HEAD,
    ir.Selection("layer", ir.KeepTop("s")),
    ir.Selection("pooled", ir.KeepTop("s"), safeguard=0.2),
    ir.Selection("head", ir.KeepTop("s", p=0.5)),
], ids=["head", "layer", "pooled", "head-top-p"])
def test_pick_equals_the_reference(selection):
    H, N, c = 3, 200, 30
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(H, N, generator=g) ** 4
    candidates = ~rselect.protected_mask(N, ir.Protect(sink=4, recent=16))
    got = kselect.pick(selection, scores.to(DEVICE), candidates.to(DEVICE), c)
    want = rselect.pick(selection, scores, candidates, c)
    assert torch.equal(got.order.cpu(), want.order) and torch.equal(got.counts.cpu(), want.counts)


def test_top_c_of_nothing():
    scores = torch.randn(2, 10, device=DEVICE)
    assert kselect.top_c(scores, torch.ones(10, dtype=torch.bool, device=DEVICE), 0).shape == (2, 0)


# --------------------------------------------------------------------------- classify


def clustered(H, N, d, dtype, c=12, seed=0, near_share=0.5, spread=1.0):
    """Keys and values where about ``near_share`` of the not-kept tokens are a
    slightly perturbed copy of one centre (cosine ~0.995) scaled by
    ``1 +- spread/2``, and the rest random (cosine ~0 to every centre); kept =
    the top ``c`` of a random score per head + sink 2 + recent 4."""
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(H, N, d, generator=g), torch.randn(H, N, d, generator=g)
    scores = torch.rand(H, N, generator=g)
    protected = rselect.protected_mask(N, ir.Protect(sink=2, recent=4))
    picks = rselect.pick(HEAD, scores, ~protected, c)
    centres = picks.mask(N)
    kept = centres | protected[None, :]
    near = (torch.rand(H, N, generator=g) < near_share) & ~kept
    owner = picks.order.gather(1, torch.randint(0, c, (H, N), generator=g))
    scale = 1 + spread * (torch.rand(H, N, 1, generator=g) - 0.5)
    for x in (keys, values):
        copy = x.gather(1, owner[..., None].expand(H, N, d)) + 0.1 * torch.randn(H, N, d, generator=g)
        x.copy_(torch.where(near[..., None], scale * copy, x))
    return keys.to(dtype), values.to(dtype), scores, kept, centres, protected


def assert_decisive(keys, values, centres, kept, merge, margin=1e-3):
    """Every not-kept token is ``margin`` (relative) away from the threshold
    and, if it passes, from its second-best centre (float64)."""
    vectors = rmerge.merge_vectors(keys.double(), values.double(), merge)
    if merge.metric == "cosine":
        vectors = [x / x.norm(dim=-1, keepdim=True) for x in vectors]
    for h in range(keys.shape[0]):
        if centres[h].sum() < 2:
            continue  # nothing to tell apart (a head without centres merges nothing)
        sims = math.prod(x[h] @ x[h, centres[h]].T for x in vectors)
        if merge.metric == "l2":
            sims = -torch.cdist(vectors[0][h], vectors[0][h, centres[h]])
        top = sims.topk(2, dim=1).values
        limit = -merge.threshold if merge.metric == "l2" else merge.threshold
        scale = max(abs(limit), 1.0)
        loose = ~kept[h] & ((top[:, 0] - limit).abs() < margin * scale)
        passes = top[:, 0] > limit
        ambiguous = ~kept[h] & passes & (top[:, 0] - top[:, 1] < margin * scale)
        assert not loose.any() and not ambiguous.any(), "test data too close to a decision boundary"


def assert_same_classes(got, want):
    for field in ("class_id", "weight", "kept_positions", "merged", "evicted"):
        assert torch.equal(getattr(got, field).cpu(), getattr(want, field)), field


# (H_kv, N, d, dtype, merge): GQA head counts, d 64/128, every dtype, each metric and target
CLASSIFY = [
    (2, 100, 64, torch.float32, ir.MergeSimilar()),
    (3, 150, 128, torch.float16, ir.MergeSimilar(target="values")),
    (4, 90, 64, torch.bfloat16, ir.MergeSimilar(metric="dot", threshold=0.4 * 64)),
    (8, 70, 128, torch.float32, ir.MergeSimilar(metric="dot", threshold=0.4 * 128, weight="uniform")),
    (4, 130, 64, torch.float16, ir.MergeSimilar(cover=0.8)),
    (3, 77, 128, torch.bfloat16, ir.MergeSimilar(threshold=0.5)),
    (2, 110, 64, torch.float32, ir.MergeSimilar(target="kv", threshold=0.8)),
    (4, 96, 128, torch.float16, ir.MergeSimilar(target="kv", threshold=0.7, cover=0.9)),
]


@pytest.mark.parametrize("H, N, d, dtype, merge", CLASSIFY)
def test_classify_equals_the_reference(H, N, d, dtype, merge):
    keys, values, scores, kept, centres, protected = clustered(H, N, d, dtype, c=N // 3, seed=N)  # 1 or 2 tiles of centres
    assert_decisive(keys, values, centres, kept, merge)
    want = rmerge.classify(keys, values, scores, kept, centres, merge, protected)
    assert (want.merged > 0).all() and (want.evicted > (~kept).sum(1) // 4).all()  # both classes occur
    got = kmerge.classify(*(x.to(DEVICE) for x in (keys, values, scores, kept, centres)), merge, protected.to(DEVICE))
    assert_same_classes(got, want)


def test_classify_without_merge_evicts_every_not_kept_token():
    keys, values, scores, kept, centres, protected = clustered(2, 60, 64, torch.float32)
    got = kmerge.classify(*(x.to(DEVICE) for x in (keys, values, scores, kept, centres)), None, protected.to(DEVICE))
    assert_same_classes(got, rmerge.classify(keys, values, scores, kept, centres, None, protected))
    assert (got.merged == 0).all()


def test_equal_centres_give_the_token_to_the_earlier_one():
    # the duplicates sit in different tiles of centres and in the same one
    H, N, d, c = 1, 120, 64, kmerge.BLOCK_CENTRES + 8
    keys, values, scores, kept, centres, protected = clustered(H, N, d, torch.float32, c=c, near_share=0.0)
    pos = centres[0].nonzero().flatten().tolist()
    first, twin, other, other_twin = pos[0], pos[kmerge.BLOCK_CENTRES + 3], pos[5], pos[6]
    keys[0, twin], keys[0, other_twin] = keys[0, first], keys[0, other]
    g = torch.Generator().manual_seed(0)
    free = (~kept[0] & ~protected).nonzero().flatten().tolist()
    keys[0, free[0]] = 2.0 * keys[0, first] + 0.05 * torch.randn(d, generator=g)
    keys[0, free[1]] = 0.5 * keys[0, other] + 0.05 * torch.randn(d, generator=g)
    merge = ir.MergeSimilar()
    got = kmerge.classify(*(x.to(DEVICE) for x in (keys, values, scores, kept, centres)), merge, protected.to(DEVICE))
    assert_same_classes(got, rmerge.classify(keys, values, scores, kept, centres, merge, protected))
    slot = kept[0].long().cumsum(0)
    assert got.class_id[0, free[:2]].tolist() == [int(slot[first]), int(slot[other])]


def test_l2_merges_tokens_closer_than_the_threshold():
    # computed here in float64: the reference inverts l2 (see test_l2_agrees_with_the_reference)
    H, N, d = 3, 90, 64
    keys, values, scores, kept, centres, protected = clustered(H, N, d, torch.float32, seed=5, spread=0.0)
    centres[2] = False  # a head without centres merges nothing
    kept[2] = protected
    merge = ir.MergeSimilar(metric="l2", threshold=0.5 * d ** 0.5)
    assert_decisive(keys, values, centres, kept, merge)
    got = kmerge.classify(*(x.to(DEVICE) for x in (keys, values, scores, kept, centres)), merge, protected.to(DEVICE))
    slot_of = kept.long().cumsum(1) * kept
    for h in range(H):
        pos = centres[h].nonzero().flatten()
        want = slot_of[h].clone()
        if len(pos):
            dist = torch.cdist(keys[h].double(), keys[h, pos].double())
            best, arg = dist.min(dim=1)
            merges = ~kept[h] & ~protected & (best < merge.threshold)
            want[merges] = slot_of[h, pos[arg[merges]]]
            assert merges.any()
        assert torch.equal(got.class_id[h].cpu(), want), h
    assert int(got.merged[2]) == 0


def test_l2_agrees_with_the_reference():
    keys, values, scores, kept, centres, protected = clustered(2, 60, 64, torch.float32, seed=6, spread=0.0)
    merge = ir.MergeSimilar(metric="l2", threshold=4.0)
    got = kmerge.classify(*(x.to(DEVICE) for x in (keys, values, scores, kept, centres)), merge, protected.to(DEVICE))
    assert_same_classes(got, rmerge.classify(keys, values, scores, kept, centres, merge, protected))


# --------------------------------------------------------------------------- scatter


# (H_kv, N, d, dtype, weight)
SCATTER = [
    (2, 100, 64, torch.float32, "score"),
    (3, 120, 128, torch.float16, "score"),
    (4, 90, 64, torch.bfloat16, "uniform"),
    (8, 60, 128, torch.float32, "uniform"),
    (8, 50, 64, torch.bfloat16, "score"),
]


@pytest.mark.parametrize("H, N, d, dtype, weight", SCATTER)
def test_scatter_equals_the_reference(H, N, d, dtype, weight):
    keys, values, scores, kept, centres, protected = clustered(H, N, d, dtype, seed=N + d)
    kept[-1, 10:N - 4] &= ~centres[-1, 10:N - 4]  # the last head keeps fewer: unused slots
    centres[-1, 10:N - 4] = False
    classes = rmerge.classify(keys, values, scores, kept, centres, ir.MergeSimilar(weight=weight), protected)
    assert classes.merged.sum() > 0 and (classes.kept_positions == -1).any()
    want_k, want_v = rmerge.scatter(keys, values, classes)
    got_k, got_v = (x.cpu() for x in kmerge.scatter(keys.to(DEVICE), values.to(DEVICE), classes_to(classes, DEVICE)))
    assert got_k.dtype == dtype and got_k.shape == want_k.shape
    torch.testing.assert_close(got_k, want_k, **SCATTER_TOL[dtype])
    torch.testing.assert_close(got_v, want_v, **SCATTER_TOL[dtype])
    # lone centres keep their bits; unused slots are zero
    members = torch.zeros(H, classes.kept_positions.shape[1] + 1, dtype=torch.long).scatter_add_(
        1, classes.class_id, torch.ones_like(classes.class_id))[:, 1:]
    alone = members == 1
    assert alone.any() and (members > 1).any()
    assert torch.equal(got_k[alone], want_k[alone]) and torch.equal(got_v[alone], want_v[alone])
    unused = classes.kept_positions == -1
    assert not got_k[unused].any() and not got_v[unused].any()


def test_scatter_merges_direction_and_norm_separately():
    # a centre e0 and one member 3 e1 of equal weight: direction (e0 + e1)/sqrt(2),
    # norm (1 + 3)/2 = 2, so the key is sqrt(2) (e0 + e1); the value is the plain mean
    keys = torch.zeros(1, 2, 16)
    keys[0, 0, 0], keys[0, 1, 1] = 1.0, 3.0
    values = torch.tensor([[[2.0] * 16, [4.0] * 16]])
    classes = rmerge.Classes(torch.tensor([[1, 1]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[0]]),
                             torch.tensor([1]), torch.tensor([0]))
    k, v = kmerge.scatter(keys.to(DEVICE), values.to(DEVICE), classes_to(classes, DEVICE))
    want = torch.zeros(16)
    want[:2] = 2 ** 0.5
    torch.testing.assert_close(k[0, 0].cpu(), want)
    torch.testing.assert_close(v[0, 0].cpu(), torch.full((16,), 3.0))


def classes_to(classes, device):
    return rmerge.Classes(*(getattr(classes, f).to(device) for f in
                            ("class_id", "weight", "kept_positions", "merged", "evicted")))


def test_pipeline_picks_triton_for_cuda_and_the_reference_on_the_cpu():
    """The compiler's choice of stages: the reference for CPU tensors (where
    Triton only runs interpreted), Triton for CUDA tensors; and the Triton
    backend, forced on the CPU under the interpreter, compresses like the
    reference."""
    from kvpolicy.compile.compiler import referenced_terms
    from kvpolicy.exec.pipeline import REFERENCE, backend_for, compile_pipeline, triton_backend
    from kvpolicy.exec.reference.scores import LayerInputs
    from kvpolicy.lang.budgets import ModelShape
    from kvpolicy.lang.registry import load

    assert backend_for(torch.device("cpu")).name in ("cpu", "reference")  # tests/kernels/test_cpu_one_pass.py
    if torch.cuda.is_available():
        assert backend_for(torch.device("cuda")).name == "triton"
    torch.manual_seed(3)
    shape = ModelShape(2, 2, 4)
    N = 150
    inputs = LayerInputs(torch.randn(2, N, 64).to(DEVICE), torch.randn(2, N, 64).to(DEVICE),
                         torch.randn(4, 32, 64).to(DEVICE), None)
    for name in ("snapkv", "ems", "streamingllm"):
        policy = load(name).with_budget(48)
        if any(isinstance(t, ir.GlobalAttention) for t in referenced_terms(policy)):
            inputs.accumulated = torch.rand(4, N).to(DEVICE)
        ref = compile_pipeline(policy, shape, N, backend=REFERENCE).compress(0, inputs)
        tri = compile_pipeline(policy, shape, N, backend=triton_backend()).compress(0, inputs)
        assert torch.equal(ref.positions.cpu(), tri.positions.cpu()), name
        torch.testing.assert_close(tri.keys.cpu(), ref.keys.cpu(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tri.values.cpu(), ref.values.cpu(), rtol=1e-5, atol=1e-5)


def test_the_kernel_modules_import_without_triton_and_fail_when_called():
    code = """
import sys
sys.modules["triton"] = None  # as if Triton were not installed
import torch
from kvpolicy.kernels import merge, select
for call in (lambda: select.top_c(torch.zeros(1, 4), torch.ones(4, dtype=torch.bool), 2),
             lambda: merge.scatter(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), None)):
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
