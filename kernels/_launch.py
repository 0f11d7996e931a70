"""What ``select`` and ``merge`` share to define and launch
their kernels: Triton imported if it can be (importing those modules never
needs it), ``jit`` that leaves a plain function without Triton, and the
check made before each launch.

Loops over a runtime length in their kernels are ``while`` loops: Triton
3.6's interpreter cannot take ``range()`` of a runtime scalar under NumPy >=
2.4 (it calls ``int()`` on a 1-element array; triton-lang/triton#9171), and
the CPU tests run interpreted.
"""

from __future__ import annotations

from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # importing works without Triton; calling a kernel says why it cannot
    triton = tl = None
    NO_TRITON: ImportError | None = exc
else:
    NO_TRITON = None


def jit(fn):
    return triton.jit(fn) if triton is not None else fn


def require_triton(x: Tensor, kernel) -> None:
    """Triton is importable and ``kernel`` can run on ``x``'s device."""
    if triton is None:
        raise ImportError(f"kvpolicy.kernels needs Triton: pip install 'kvpolicy[triton]' ({NO_TRITON})") \
            from NO_TRITON
    if x.device.type != "cuda" and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(f"Triton kernels run compiled on CUDA tensors only; for {x.device.type} tensors set "
                           "TRITON_INTERPRET=1 before triton is first imported (Triton's interpreter)")
