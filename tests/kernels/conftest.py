"""Kernel tests: compiled on CUDA tensors when torch sees a GPU, otherwise in
Triton's interpreter on CPU tensors (small sizes; slow, exact).

The interpreter needs ``TRITON_INTERPRET=1`` *before triton is first
imported*: Triton 3.6 reads it when it decorates its own ``tl`` library
functions (at import) and each ``@triton.jit`` kernel. Setting it here works
because nothing imports triton before pytest loads this file (torch,
transformers and kvpolicy do not; ``test_the_mode_is_the_one_this_machine_needs``
checks it). Without Triton, or with Triton imported in the wrong mode, every
test here fails with the reason; none skips.
"""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from kvpolicy import kernels  # imports no triton


@pytest.fixture(scope="session")
def device() -> str:
    """The tests' device, once kernels can run on it (raises, failing the test, if not)."""
    kernels.require(DEVICE)
    return DEVICE
