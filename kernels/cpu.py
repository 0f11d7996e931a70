"""The one attention pass of a prefill as a compiled CPU kernel
(``csrc/one_pass.cpp``), with the signature of
:func:`kvpolicy.exec.reference.attention.attention_with_column_sums`, its
pure-torch reference.

Why: the reference writes each tile's logits and probabilities (``n_rep *
64`` rows by up to ``N`` keys, 6 MB at 4k tokens) through memory between
torch calls. Here one task is a KV head and ``block`` queries of its query
heads, its logits are sized to stay in the core's L2 cache, and the softmax,
the column sums and both products run on that tile before the next one. On 2
CPU cores at 4096 tokens (SmolLM2-135M's 9 / 3 heads, d = 64) this runs in
1.01 to 1.08x SDPA's time over the same rows, where the reference takes 1.27
to 1.40x (medians of call-by-call ratios in two runs of ``python
bench/one_pass_spread.py``).

The extension is compiled on first use (``torch.utils.cpp_extension``, g++
and ninja, about 35 s on 2 cores; ``make install`` builds it ahead:
``python -m kvpolicy.kernels.cpu``) for this machine's CPU (``-march=native``),
and cached under torch's extensions folder (``TORCH_EXTENSIONS_DIR``) by the
source's hash and the CPU's flags. Where it cannot be built, :func:`available`
says why and the pipeline keeps the reference (:func:`kvpolicy.exec.pipeline.backend_for`).
``KVPOLICY_CPU_KERNEL=0`` in the environment keeps the reference on purpose.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).resolve().parent / "csrc" / "one_pass.cpp"
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
# Rows of logits a task keeps: block queries x n_rep heads x N keys fp32,
# capped so that a tile stays within the L2 cache's size (1 MiB measured here).
TILE_BYTES = 1 << 20
BLOCK = 32  # queries a task at most: 16 to 48 measured within noise at 4k, 64 slower

_lock = threading.Lock()
_module = None
_error: str | None = None


def _cpu_signature() -> str:
    """What the compiled code depends on besides the source: the CPU's flags
    (``-march=native``) and the flags passed to the compiler."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags} {' '.join(FLAGS)}".encode()).hexdigest()[:10]


def disabled() -> bool:
    """``KVPOLICY_CPU_KERNEL=0``: the reference on purpose (benches, comparisons)."""
    return os.environ.get("KVPOLICY_CPU_KERNEL", "1") == "0"


def load(verbose: bool = False):
    """The compiled extension, built on first use; ``RuntimeError`` saying why
    when it cannot be (no compiler, no ninja, a compiler error)."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise RuntimeError(_error)
        try:
            from torch.utils.cpp_extension import load as build
            _module = build(f"kvpolicy_one_pass_{_cpu_signature()}", [str(SOURCE)], extra_cflags=FLAGS,
                            extra_ldflags=["-fopenmp"], verbose=verbose)
        except Exception as exc:  # any build failure means: keep the reference
            _error = f"the CPU one-pass kernel could not be built ({type(exc).__name__}: {exc})"
            raise RuntimeError(_error) from exc
        return _module


def available() -> str | None:
    """``None`` when the kernel runs here, else why not (built on first call)."""
    if disabled():
        return "KVPOLICY_CPU_KERNEL=0"
    try:
        load()
    except RuntimeError as exc:
        return str(exc)
    return None


def attention_with_column_sums(queries: Tensor, keys: Tensor, values: Tensor | None, n_rep: int,
                               block: int = BLOCK, scale: float | None = None) -> tuple[Tensor | None, Tensor]:
    """Causal attention output ``[H, T, d_v]`` fp32 (when ``values`` are given)
    and the accumulated attention ``[H, N]`` fp32 from the same softmax rows, as
    :func:`kvpolicy.exec.reference.attention.attention_with_column_sums`
    (``queries [H, T, d]`` the last ``T`` of the ``N`` positions of ``keys
    [H_kv, N, d]``); equal to it to fp32 rounding. CPU tensors only.
    ``block`` bounds the queries a task (fewer when the tile would outgrow
    :data:`TILE_BYTES`)."""
    H, T, d = queries.shape
    H_kv, N = keys.shape[:2]
    if keys.shape[2] != d or H != H_kv * n_rep:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} do not match n_rep={n_rep}")
    if T > N:
        raise ValueError(f"{T} queries but only {N} keys")
    if values is not None and tuple(values.shape[:2]) != (H_kv, N):
        raise ValueError(f"values {tuple(values.shape)} do not match keys {tuple(keys.shape)}")
    if queries.device.type != "cpu":
        raise ValueError(f"the CPU one-pass kernel got {queries.device} tensors")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = (queries.float() * scale).contiguous().view(H_kv, n_rep, T, d)
    k = keys.float().contiguous()
    v = values.float().contiguous() if values is not None else torch.empty(0)
    rows = max(1, min(block, TILE_BYTES // (4 * n_rep * max(N, 1))))
    out, acc = load().attention_with_column_sums(q, k, v, rows)
    return (out.view(H, T, v.shape[-1]) if values is not None else None), acc.view(H, N)


def accumulated_attention(queries: Tensor, keys: Tensor, n_rep: int, block: int = BLOCK) -> Tensor:
    """H2O's accumulated attention ``[H, N]`` alone; see :func:`attention_with_column_sums`."""
    return attention_with_column_sums(queries, keys, None, n_rep, block=block)[1]


def main() -> int:
    """``python -m kvpolicy.kernels.cpu``: build the kernel now (``make install``
    does), say where it runs or why it cannot."""
    t = time.perf_counter()
    why = available()
    if why is None:
        print(f"kvpolicy: CPU one-pass kernel ready ({time.perf_counter() - t:.1f} s)")
        return 0
    print(f"kvpolicy: {why}; the pure-torch one pass will be used", file=sys.stderr)
    return 0  # not an install failure: the reference serves everywhere


if __name__ == "__main__":
    sys.exit(main())
