"""kvpolicy: a policy language for KV-cache compression.

    import kvpolicy as kp
    p = kp.load("ems")                     # a shipped policy, or kp.load("my.kvp")
    q = kp.snapkv(budget=256).with_layers(kp.pyramid(beta=20))
    print(q.to_kvp())

Layering (no upward imports): ``kvpolicy.dsl`` (text) -> ``kvpolicy.ir`` ->
``kvpolicy.compiler`` (plans) -> back ends (reference, kernels, SGLang).
"""

from kvpolicy.compose import (
    METHODS,
    adakv,
    adaptive,
    as_budget,
    avg_pool,
    compresskv,
    ems,
    explicit,
    full,
    global_,
    h2o,
    key_norm,
    local,
    max_pool,
    mean_align,
    per_head,
    per_layer,
    policy,
    pooled_heads,
    pyramid,
    pyramidkv,
    rank,
    recency,
    retrieval,
    similar,
    snapkv,
    streamingllm,
    uniform,
    value_norm,
    with_pool,
    with_window,
    zscore,
)
from kvpolicy.errors import PolicyError
from kvpolicy.ir import Policy
from kvpolicy.registry import load, shipped_names

__version__ = "0.1.0"

__all__ = [
    "METHODS", "Policy", "PolicyError", "adakv", "adaptive", "as_budget", "avg_pool", "compresskv", "ems",
    "explicit", "full", "global_", "h2o", "key_norm", "load", "local", "max_pool", "mean_align", "per_head",
    "per_layer", "policy", "pooled_heads", "pyramid", "pyramidkv", "rank", "recency", "retrieval", "shipped_names",
    "similar", "snapkv", "streamingllm", "uniform", "value_norm", "with_pool", "with_window", "zscore",
]
