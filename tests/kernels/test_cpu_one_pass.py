"""The compiled CPU one pass (kernels/csrc/one_pass.cpp) against its pure-torch
reference, over the shapes serving and the transformers path give it.

gcc and ninja are on every machine this project installs on (``make install``
builds the kernel): where it does not build, these tests fail with the
compiler's reason rather than skip.
"""

import pytest
import torch

from kvpolicy.exec.pipeline import backend_for
from kvpolicy.exec.reference import attention as reference
from kvpolicy.kernels import cpu


@pytest.fixture(scope="module")
def kernel():
    why = cpu.available()
    assert why is None, why
    return cpu


def _inputs(H_kv, n_rep, T, N, d, d_v=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(H_kv * n_rep, T, d, generator=g).to(dtype)
    # keys and values as the pool's gather gives them: [N, H_kv, d] transposed
    k = torch.randn(N, H_kv, d, generator=g).to(dtype).transpose(0, 1)
    v = torch.randn(N, H_kv, d_v or d, generator=g).to(dtype).transpose(0, 1)
    return q, k, v


@pytest.mark.parametrize("H_kv, n_rep, T, N, d, d_v", [
    (1, 1, 1, 1, 8, None),       # one token
    (3, 3, 100, 100, 64, None),  # SmolLM2's heads, a prompt not a multiple of the block
    (2, 4, 257, 257, 32, 16),    # d_v != d
    (2, 2, 37, 150, 16, None),   # a chunk of a chunked prefill: queries see earlier keys
    (1, 5, 1, 64, 24, None),     # a one-token chunk
    (2, 1, 0, 40, 16, None),     # an empty chunk
])
@pytest.mark.parametrize("block", [1, 7, 32])
def test_equals_the_reference(kernel, H_kv, n_rep, T, N, d, d_v, block):
    q, k, v = _inputs(H_kv, n_rep, T, N, d, d_v)
    out, acc = kernel.attention_with_column_sums(q, k, v, n_rep, block=block)
    ref_out, ref_acc = reference.attention_with_column_sums(q, k, v, n_rep)
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc, ref_acc, rtol=1e-5, atol=1e-4)
    # each query row's probabilities sum to one, so the column sums add up to T per head
    torch.testing.assert_close(acc.sum(-1), torch.full((H_kv * n_rep,), float(T)), rtol=1e-5, atol=1e-3)


def test_column_sums_alone_scale_and_low_precision_inputs(kernel):
    q, k, _ = _inputs(2, 3, 90, 90, 32, dtype=torch.bfloat16)
    acc = kernel.accumulated_attention(q, k, 3)
    torch.testing.assert_close(acc, reference.accumulated_attention(q, k, 3), rtol=1e-5, atol=1e-4)
    out, acc = kernel.attention_with_column_sums(q, k, None, 3, scale=0.3)
    assert out is None
    torch.testing.assert_close(acc, reference.attention_with_column_sums(q, k, None, 3, scale=0.3)[1],
                               rtol=1e-5, atol=1e-4)


def test_large_logits_stay_finite(kernel):
    q, k, v = _inputs(1, 2, 50, 50, 16)
    out, acc = kernel.attention_with_column_sums(q * 300, k * 300, v, 2)
    assert torch.isfinite(out).all() and torch.isfinite(acc).all()
    ref_out, ref_acc = reference.attention_with_column_sums(q * 300, k * 300, v, 2)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(acc, ref_acc, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("threads", [1, 2])
def test_any_thread_count_gives_the_same_sums(kernel, threads):
    q, k, v = _inputs(3, 3, 300, 300, 16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out, acc = kernel.attention_with_column_sums(q, k, v, 3, block=8)
    finally:
        torch.set_num_threads(before)
    ref_out, ref_acc = reference.attention_with_column_sums(q, k, v, 3)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acc, ref_acc, rtol=1e-5, atol=1e-4)


def test_bad_arguments_say_what_is_wrong(kernel):
    q, k, v = _inputs(2, 2, 10, 10, 8)
    with pytest.raises(ValueError, match="do not match n_rep"):
        kernel.attention_with_column_sums(q, k, v, 3)
    with pytest.raises(ValueError, match="queries but only"):
        kernel.attention_with_column_sums(torch.randn(4, 11, 8), k, v, 2)
    with pytest.raises(ValueError, match="values"):
        kernel.attention_with_column_sums(q, k, v[:, :5], 2)


def test_the_cpu_backend_runs_it_unless_switched_off(kernel, monkeypatch):
    backend = backend_for(torch.device("cpu"))
    assert backend.name == "cpu"
    assert backend.attention_with_column_sums is cpu.attention_with_column_sums
    monkeypatch.setenv("KVPOLICY_CPU_KERNEL", "0")
    assert backend_for(torch.device("cpu")).name == "reference"


def test_a_build_failure_keeps_the_reference_and_says_why(monkeypatch):
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "_error", "the CPU one-pass kernel could not be built (no compiler)")
    assert cpu.available() == cpu._error
    assert backend_for(torch.device("cpu")).name == "reference"
    with pytest.raises(RuntimeError, match="no compiler"):
        cpu.attention_with_column_sums(*_inputs(1, 1, 4, 4, 8), 1)
