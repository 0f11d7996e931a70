"""Triton attention kernels against their pure-torch references.

On a CPU-only machine these run in Triton's interpreter (see conftest.py), at
small sizes, with tile sizes small enough that N is never a multiple of them.

Tolerances. Kernel and reference compute the logits in fp32 from the *same*
inputs (the reference upcasts fp16/bf16; fp16/bf16 products are exact in fp32
and the kernels accumulate in fp32; fp32 operands on the GPU use tf32x3, about
fp32 accuracy, not TF32), so probabilities and their sums differ only by fp32
rounding (summation order, ``exp2`` with ``log2(e)`` folded into the scale):
``rtol=1e-4`` with a small ``atol`` covers that for every input dtype. The one place the input dtype
shows is the attention *output* ``P @ V``: as in FlashAttention the kernel
rounds ``P`` to the value dtype before that product (on the GPU; the
interpreter keeps bf16 in fp32), an error of up to the dtype's half-ulp
(fp16 2^-11, bf16 2^-8) relative to ``max |v|`` (about 4 here).
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from kvpolicy import kernels
from kvpolicy.exec.reference import attention as R
from kvpolicy.exec.reference.scores import LayerInputs, ScoreContext, local_term
from kvpolicy.kernels import attention as K
from kvpolicy.lang import ir

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STATS = {"rtol": 1e-4, "atol": 1e-6}  # probabilities, their sums, accumulated attention
OUTPUT = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float16: {"rtol": 0, "atol": 4 * 2**-11},
          torch.bfloat16: {"rtol": 0, "atol": 4 * 2**-8}}


def inputs(H_kv, n_rep, N, d, dtype, device, spread=2.0, seed=0):
    """Queries ``[H, N, d]`` (logits ~ N(0, spread^2) after the 1/sqrt(d) scale), keys and values."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H_kv * n_rep, N, d, generator=g) * spread
    k = torch.randn(H_kv, N, d, generator=g)
    v = torch.randn(H_kv, N, d, generator=g)
    return [x.to(dtype).to(device) for x in (q, k, v)]


def close(actual, expected, **tol):
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, **tol)


def test_the_mode_is_the_one_this_machine_needs(device):
    # the conftest set TRITON_INTERPRET in time on a CPU-only machine
    assert kernels.available(device) == ("compiled" if device == "cuda" else "interpreted")


# (H_kv, n_rep, N, d, captured queries, window, block): GQA 1:1, 3:1, 4:1; d 64 and 128;
# N = 37, 100, 300 against blocks of 16, 32, 64 (never a multiple); windows 1 .. N
SHAPES = [
    (2, 1, 37, 64, 8, 8, 16),
    (1, 3, 100, 128, 16, 11, 32),
    (1, 4, 300, 64, 8, 5, 64),
    (2, 3, 37, 128, 37, 37, 32),  # the window is the whole prompt: nothing before it
    (1, 4, 100, 64, 4, 1, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_window_attention(shape, dtype, device):
    H_kv, n_rep, N, d, W_cap, w, block = shape
    q, k, _ = inputs(H_kv, n_rep, N, d, dtype, device)
    q = q[:, N - W_cap:]
    got = K.window_attention(q, k, n_rep, window=w, block_n=block, block_m=block)
    close(got, R.window_attention(q, k, n_rep, window=w), **STATS)
    # causal: the window's query i sees nothing after position N - w + i
    assert not got.masked_select(torch.ones(w, N, dtype=torch.bool, device=device).triu(N - w + 1)).any()


@pytest.mark.parametrize("keys_per_split", [32, 96, 1000])
def test_window_attention_split_keys(keys_per_split, device):
    """Pass 1 split over programs (as on a GPU), partial sums combined; also
    large logits (std 40), which overflow without the running max."""
    q, k, _ = inputs(1, 3, 300, 64, torch.float32, device, spread=40.0, seed=3)
    q = q[:, -16:]
    got = K.window_attention(q, k, 3, window=16, block_n=32, keys_per_split=keys_per_split)
    assert got.isfinite().all()
    close(got, R.window_attention(q, k, 3, window=16), **STATS)


def test_window_attention_scale(device):
    q, k, _ = inputs(2, 2, 100, 64, torch.float32, device)
    q = q[:, -8:]
    close(K.window_attention(q, k, 2, scale=0.3, block_n=32), R.window_attention(q, k, 2, scale=0.3), **STATS)


POOLS = [None, ir.Pool("avg", 5), ir.Pool("max", 7)]


@pytest.mark.parametrize("pool", POOLS, ids=str)
@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_window_scores_every_reduction(pool, reduce, gqa, device):
    H_kv, n_rep, N, d, W_cap, w, block = SHAPES[1]
    q, k, _ = inputs(H_kv, n_rep, N, d, torch.float32, device)
    q = q[:, N - W_cap:]
    kw = {"reduce": reduce, "gqa": gqa, "pool": pool}
    got = K.window_scores(q, k, n_rep, window=w, block_n=block, **kw)
    close(got, K.window_scores_reference(q, k, n_rep, window=w, **kw), **STATS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, pool, gqa", [(SHAPES[0], ir.Pool("max", 3), "mean"),
                                              (SHAPES[2], ir.Pool("avg", 7), "max"),
                                              (SHAPES[3], ir.Pool("avg", 5), "mean"),
                                              (SHAPES[4], ir.Pool("max", 9), "max")], ids=str)
def test_window_scores_is_the_local_score(shape, pool, gqa, dtype, device):
    """The fused kernel equals the score code's own local() term (scores.local_term)."""
    H_kv, n_rep, N, d, W_cap, w, block = shape
    q, k, v = inputs(H_kv, n_rep, N, d, dtype, device, seed=1)
    q = q[:, N - W_cap:]
    ctx = ScoreContext(LayerInputs(k, v, q), n_rep, torch.ones(N, dtype=torch.bool, device=device))
    expected = local_term(ir.LocalAttention(window=w, pool=pool, gqa=gqa), ctx)
    close(K.window_scores(q, k, n_rep, window=w, pool=pool, gqa=gqa, block_n=block), expected, **STATS)


# (H_kv, n_rep, N, d, block)
CAUSAL = [(2, 1, 37, 64, 16), (1, 3, 100, 128, 32), (1, 4, 300, 64, 64), (2, 4, 37, 64, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CAUSAL, ids=str)
def test_accumulated_attention(shape, dtype, device):
    H_kv, n_rep, N, d, block = shape
    q, k, _ = inputs(H_kv, n_rep, N, d, dtype, device)
    got = K.accumulated_attention(q, k, n_rep, block=block)
    close(got, R.accumulated_attention(q, k, n_rep, block=block), **STATS)
    # each query row is a distribution: the column sums add up to N per head
    close(got.double().sum(1).float(), torch.full((H_kv * n_rep,), float(N), device=device), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [CAUSAL[1], CAUSAL[3]], ids=str)
def test_attention_with_column_sums(shape, dtype, device):
    H_kv, n_rep, N, d, block = shape
    q, k, v = inputs(H_kv, n_rep, N, d, dtype, device, seed=2)
    out, acc = K.attention_with_column_sums(q, k, v, n_rep, block=block)
    ref_out, ref_acc = R.attention_with_column_sums(q, k, v, n_rep, block=block)
    close(acc, ref_acc, **STATS)
    close(out, ref_out, **OUTPUT[dtype])
    # and the output is the prefill's causal attention
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(n_rep, 0), v.float().repeat_interleave(n_rep, 0), is_causal=True)
    close(out, sdpa, **OUTPUT[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T, N, block", [(1, 37, 16), (30, 100, 32), (64, 100, 32)])
def test_a_prefill_chunk(T, N, block, dtype, device):
    """Queries are the last T of N positions (one chunk of a chunked prefill)."""
    q, k, v = inputs(1, 3, N, 64, dtype, device, seed=T)
    q = q[:, N - T:]
    out, acc = K.attention_with_column_sums(q, k, v, 3, block=block)
    ref_out, ref_acc = R.attention_with_column_sums(q, k, v, 3, block=block)
    close(acc, ref_acc, **STATS)
    close(out, ref_out, **OUTPUT[dtype])
    close(K.accumulated_attention(q, k, 3, block=block), ref_acc, **STATS)


def test_chunks_add_up_to_the_whole_prompt(device):
    q, k, _ = inputs(2, 2, 70, 64, torch.float32, device, seed=6)
    chunked = torch.zeros(4, 70, device=device)
    for start, stop in [(0, 20), (20, 21), (21, 70)]:
        chunked[:, :stop] += K.accumulated_attention(q[:, start:stop], k[:, :stop], 2, block=32)
    close(chunked, R.accumulated_attention(q, k, 2), **STATS)


def test_large_logits_and_the_default_block(device):
    q, k, _ = inputs(1, 2, 70, 64, torch.float32, device, spread=40.0, seed=4)
    got = K.accumulated_attention(q, k, 2)  # block=256 -> tiles of CAUSAL_BLOCK
    assert got.isfinite().all()
    close(got, R.accumulated_attention(q, k, 2), **STATS)


def test_non_power_of_two_head_dim_and_strided_inputs(device):
    q, k, _ = inputs(1, 2, 50, 80, torch.float16, device, seed=5)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, head stride 80 instead of 50 * 80
    close(K.accumulated_attention(qt, k, 2, block=16), R.accumulated_attention(q, k, 2), **STATS)
    close(K.window_attention(qt[:, -6:], k, 2, block_n=16), R.window_attention(q[:, -6:], k, 2), **STATS)


def test_bad_arguments(device):
    q, k, _ = inputs(1, 2, 20, 16, torch.float32, device)
    with pytest.raises(ValueError, match="window 9 needs 1..8"):
        K.window_attention(q[:, -8:], k, 2, window=9)
    with pytest.raises(ValueError, match="n_rep=3"):
        K.accumulated_attention(q, k, 3)
    with pytest.raises(ValueError, match="20 queries but only 10 keys"):
        K.accumulated_attention(q, k[:, :10], 2)
    with pytest.raises(ValueError, match="size odd"):
        K.window_scores(q[:, -8:], k, 2, pool=ir.Pool("avg", 4))
    with pytest.raises(ValueError, match="'sum' or 'max'"):
        K.window_scores(q[:, -8:], k, 2, reduce="mean")
    with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        K.accumulated_attention(q.double(), k.double(), 2)


def test_without_triton_a_kernel_call_says_so(monkeypatch):
    monkeypatch.setattr(kernels, "_triton", lambda: ImportError("No module named 'triton'"))
    assert kernels.available("cpu") is None
    q, k, _ = inputs(1, 1, 8, 16, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"need Triton: pip install 'kvpolicy\[triton\]'"):
        K.accumulated_attention(q, k, 1)


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_and_takes_extra_cases(tmp_path, device):
    extra = tmp_path / "extra.py"
    extra.write_text(
        "import torch\n"
        "def cases(device, scale):\n"
        "    x = torch.arange(10.0, device=device)\n"
        "    return [dict(name='cumsum', kernel=torch.cumsum, reference=lambda t, d: t.cumsum(d),\n"
        "                 bytes=80, make_args=lambda: (x, 0))]\n")
    bench = _load_bench()
    args = ["--device", device, "--scale", "tiny", "--out-dir", str(tmp_path), "--extra", str(extra), "--repeats", "1",
            "--n", "40", "--dtype", "float32"]
    report = bench.main(args)
    path = Path(report["path"])
    assert path.parent == tmp_path and path.name.startswith("kernels_")
    data = json.loads(path.read_text())
    assert {"device", "mode", "peak_bytes_per_s", "note", "results"} <= data.keys()
    names = [r["name"] for r in data["results"]]
    assert {"window_attention", "window_scores", "accumulated_attention", "attention_with_column_sums",
            "cumsum"} <= set(names)
    for r in data["results"]:
        assert {"name", "n", "kernel_s", "reference_s", "speedup", "prefill_s", "vs_prefill", "bytes",
                "bytes_per_s", "of_peak", "max_abs_diff"} <= r.keys()
        assert r["kernel_s"] > 0 and r["bytes"] > 0
        assert r["max_abs_diff"] is not None and math.isfinite(r["max_abs_diff"]) and r["max_abs_diff"] < 1e-3
    if device == "cpu":
        assert data["mode"] == "interpreted" and "not a speed figure" in data["note"]


# (sequences, n_rep, padded rows M, d, d_v, block, logit cap): GQA 1:1 and 4:1; kept
# counts that leave padding before the decoded tokens; M never a multiple of the block
SPLIT_SHAPES = [(3, 1, 37, 64, 64, 16, 0.0), (4, 4, 100, 128, 128, 32, 0.0), (2, 3, 45, 64, 32, 16, 30.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("S, n_rep, M, d, d_v, block, cap", SPLIT_SHAPES)
def test_split_decode_attention_matches_reference(device, dtype, S, n_rep, M, d, d_v, block, cap):
    g = torch.Generator().manual_seed(S * M)
    q = (torch.randn(S, n_rep, d, generator=g) * 2).to(dtype).to(device)
    k = torch.randn(S, M, d, generator=g).to(dtype).to(device)
    v = torch.randn(S, M, d_v, generator=g).to(dtype).to(device)
    split = torch.full((S,), M - 5)
    kept = torch.randint(1, M - 5, (S,), generator=g)
    kept[0] = M - 5  # one sequence with no padding at all
    end = split + torch.randint(1, 6, (S,), generator=g)
    scale = 1 / math.sqrt(d)
    expected = R.split_decode_attention(q, k, v, kept, split, end, scale, cap)
    actual = K.split_decode_attention(q, k, v, kept.to(device), split.to(device), end.to(device), scale, cap,
                                      block=block)
    close(actual.cpu(), expected.cpu(), **OUTPUT[dtype])


def test_split_decode_attention_reads_only_the_two_ranges():
    """Hand-built: rows outside [0, kept) and [split, end) hold huge keys and
    values that would dominate if they were read; the answer is the softmax
    over the visible rows alone."""
    q = torch.ones(1, 1, 2)
    k = torch.tensor([[[1.0, 0.0], [50.0, 50.0], [0.0, 1.0], [50.0, 50.0]]])
    v = torch.tensor([[[1.0], [1e6], [3.0], [1e6]]])
    out = R.split_decode_attention(q, k, v, torch.tensor([1]), torch.tensor([2]), torch.tensor([3]), 1.0)
    torch.testing.assert_close(out, torch.tensor([[[2.0]]]))  # equal logits: the mean of 1 and 3
