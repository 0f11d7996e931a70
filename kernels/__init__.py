"""Triton kernels for the compression pipeline, each beside its pure-torch
reference (importable as ``kvpolicy.kernels``; the top-level name ``kernels``
belongs to Hugging Face's distribution that SGLang depends on).

Empty until the kernel work lands; nothing imports from here yet.
"""
