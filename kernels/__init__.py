"""Triton kernels for the compression pipeline, each beside its pure-torch
reference (importable as ``kvpolicy.kernels``; the top-level name ``kernels``
belongs to Hugging Face's distribution that SGLang depends on).

``kvpolicy.kernels.attention``: the attention statistics the scores read
(observation-window attention, the fused SnapKV score, H2O's accumulated
attention), same signatures as :mod:`kvpolicy.exec.reference.attention`.

How kernels run is fixed when Triton is first imported, for the whole process:

* compiled (the normal case): kernels run on CUDA tensors;
* interpreted: ``TRITON_INTERPRET=1`` was in the environment when ``triton``
  was first imported (Triton builds its own ``tl`` library functions for one
  mode or the other at that moment). Kernels then run in Triton's numpy
  interpreter on any tensors -- how the tests run on a CPU-only machine. Not a
  speed figure.

Importing this package never imports Triton; :func:`available` does.
"""

from __future__ import annotations

import os


def _triton():
    """The imported ``triton`` module, or the ``ImportError`` that importing it raised."""
    try:
        import triton
        import triton.language  # the mode is fixed once this has run
    except ImportError as exc:
        return exc
    return triton


def interpreted() -> bool:
    """Whether Triton was imported in interpreter mode (see the module docstring).

    Checked on Triton's own library functions rather than the environment,
    which may have changed since the import."""
    triton = _triton()
    if isinstance(triton, ImportError):
        return False
    from triton.language import standard
    return type(standard.cdiv).__name__ == "InterpretedFunction"


def available(device: str | None = None) -> str | None:
    """How kernels run on tensors of ``device`` (default: ``"cuda"`` when torch
    sees a GPU, else ``"cpu"``): ``"compiled"``, ``"interpreted"``, or ``None``
    when they cannot run there (:func:`require` says why)."""
    try:
        return require(device)
    except RuntimeError:
        return None


def require(device: str | None = None) -> str:
    """:func:`available`'s answer, or a ``RuntimeError`` saying what is missing."""
    import torch

    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    triton = _triton()
    if isinstance(triton, ImportError):
        raise RuntimeError("the Triton kernels need Triton: pip install 'kvpolicy[triton]' "
                           f"(triton==3.6.0); importing it failed: {triton}") from triton
    if interpreted():
        _fix_interpreter_index()
        return "interpreted"
    if kind != "cuda":
        late = (" (TRITON_INTERPRET is set now, but was not when triton was imported)"
                if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "")
        raise RuntimeError(f"Triton kernels run compiled on CUDA tensors only; for {kind} tensors set "
                           f"TRITON_INTERPRET=1 before triton is first imported (Triton's interpreter){late}")
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA tensors were asked for but torch sees no GPU")
    return "compiled"


_INDEX_FIXED = False


def _fix_interpreter_index() -> None:
    """Make the interpreter's scalar ``__index__`` work with numpy >= 2.4.

    Triton 3.6's interpreter holds kernel scalars as 1-element arrays and
    converts them with ``int(array)``, which numpy 2.4 rejects ("only
    0-dimensional arrays can be converted to Python scalars"), so any
    ``range(lo, hi)`` over a runtime bound fails. This applies upstream's fix
    (triton-lang/triton issue #9171, PR #9172: ``int(data.squeeze())``) to the
    interpreter only; compiled kernels are untouched.
    """
    global _INDEX_FIXED
    if _INDEX_FIXED:
        return
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # a Triton without that hook: nothing to fix
        _INDEX_FIXED = True
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    _INDEX_FIXED = True

