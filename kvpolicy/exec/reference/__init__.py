"""The reference executor: every pipeline stage in plain PyTorch, exact, on any
device. It is the ground truth that the Triton kernels and the SGLang path are
tested against (ARCHITECTURE.md § Execution)."""
