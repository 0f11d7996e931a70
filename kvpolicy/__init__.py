"""kvpolicy: a policy language for KV-cache compression.

    import kvpolicy as kp
    p = kp.load("ems")                     # a shipped policy, or kp.load("my.kvp")
    q = kp.snapkv(budget=256).with_layers(kp.pyramid(beta=20))
    print(q.to_kvp())

Layering (no upward imports): ``kvpolicy.dsl`` (text) -> ``kvpolicy.lang.ir`` ->
``kvpolicy.compile.compiler`` (plans) -> back ends (reference, kernels, SGLang).
"""

import importlib

# The public names, each from the module that defines it. Loaded on first use
# (PEP 562), so importing a lower layer (``kvpolicy.lang.ir``, the executor, the
# serving runtime) does not load the language's parser with the package.
_COMPOSE = (
    "METHODS",
    "adakv",
    "adaptive",
    "as_budget",
    "avg_pool",
    "compresskv",
    "ems",
    "explicit",
    "full",
    "global_",
    "h2o",
    "key_norm",
    "local",
    "max_align",
    "max_pool",
    "mean_align",
    "per_head",
    "per_layer",
    "policy",
    "pooled_heads",
    "pyramid",
    "pyramidkv",
    "rank",
    "recency",
    "redundancy",
    "retrieval",
    "rkv",
    "similar",
    "snapkv",
    "spankv",
    "streamingllm",
    "uniform",
    "value_norm",
    "with_pool",
    "with_window",
    "zscore",
)
_WHERE = {**{name: "kvpolicy.lang.compose" for name in _COMPOSE}, "PolicyError": "kvpolicy.lang.errors",
          "Policy": "kvpolicy.lang.combinators", "load": "kvpolicy.lang.registry", "shipped_names": "kvpolicy.lang.registry"}
_SUBPACKAGES = ("compile", "dsl", "eval", "exec", "hf", "kernels", "lang", "policies", "sglang_ext")


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"kvpolicy.{name}")
    else:
        raise AttributeError(f"module 'kvpolicy' has no attribute '{name}'")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(__all__) | set(_SUBPACKAGES) | {"__version__"})


__version__ = "0.1.0"

__all__ = [
    "METHODS", "Policy", "PolicyError", "adakv", "adaptive", "as_budget", "avg_pool", "compresskv", "ems",
    "explicit", "full", "global_", "h2o", "key_norm", "load", "local", "max_align", "max_pool", "mean_align", "per_head",
    "per_layer", "policy", "pooled_heads", "pyramid", "pyramidkv", "rank", "recency", "redundancy", "retrieval", "rkv", "shipped_names",
    "similar", "snapkv", "spankv", "streamingllm", "uniform", "value_norm", "with_pool", "with_window", "zscore",
]
