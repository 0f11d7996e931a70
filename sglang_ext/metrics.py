"""kvpolicy's Prometheus metrics, served by SGLang's own ``/metrics``.

With ``--enable-metrics`` SGLang sets ``PROMETHEUS_MULTIPROC_DIR`` before it
starts its scheduler processes, and its HTTP server's ``/metrics`` collects
every process's metrics from that folder. The counters here are created in
the scheduler process that compresses (only when that variable is set), so
they appear next to SGLang's ``sglang:*`` metrics with no extra endpoint:

* ``kvpolicy:requests_compressed_total{policy, layout}``
* ``kvpolicy:prompt_tokens_total{policy}`` -- prompt tokens of compressed requests
* ``kvpolicy:slots_kept_total{policy}`` -- slots their compressed prompts hold
* ``kvpolicy:slots_freed_total{policy}`` -- uncompressed slots given back to the allocator
* ``kvpolicy:slots_released_to_tree_total{policy}`` -- uncompressed slots left in the radix tree as evictable cache
* ``kvpolicy:compression_seconds{policy}`` -- a histogram, per compressed request
* ``kvpolicy:requests_left_exact_total{reason}`` -- requests served with their exact KV, and why
* ``kvpolicy:decode_compressions_total{policy}`` -- recompressions by a decode trigger
  (``trigger prefill, every N tokens``), during decoding; a request whose prompt was
  within budget is also counted once in ``requests_compressed_total``, at its first
* ``kvpolicy:decode_slots_freed_total{policy}`` -- slots those gave back to the allocator
* ``kvpolicy:decode_compression_seconds{policy}`` -- a histogram, per recompression
"""

from __future__ import annotations

import os

ENV = "PROMETHEUS_MULTIPROC_DIR"
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: why a request kept its exact KV (the ``reason`` label)
LEFT_EXACT = {
    "no_selection": "its policy keeps every token (e.g. full)",
    "within_budget": "its prompt is within the budget, or the policy cannot be planned at this length",
    "policy_unreadable": "its own policy could not be read",
    "no_room": "no room for its compressed copy, even after releasing its own prompt",
    "capture_incomplete": "its prefill did not leave what compression needs",
    "error": "compression raised an error (logged)",
}


class Metrics:
    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.compressed = Counter("kvpolicy:requests_compressed", "Requests whose KV was compressed",
                                  ["policy", "layout"])
        self.prompt_tokens = Counter("kvpolicy:prompt_tokens", "Prompt tokens of compressed requests", ["policy"])
        self.slots_kept = Counter("kvpolicy:slots_kept", "Slots the compressed prompts hold", ["policy"])
        self.slots_freed = Counter("kvpolicy:slots_freed", "Uncompressed slots given back to the allocator",
                                   ["policy"])
        self.slots_released = Counter("kvpolicy:slots_released_to_tree",
                                      "Uncompressed slots left in the radix tree as evictable cache", ["policy"])
        self.seconds = Histogram("kvpolicy:compression_seconds", "Seconds to compress one request", ["policy"],
                                 buckets=SECONDS_BUCKETS)
        self.left_exact = Counter("kvpolicy:requests_left_exact", "Requests served with their exact KV, by reason",
                                  ["reason"])

        self.decode_compressions = Counter("kvpolicy:decode_compressions",
                                           "Recompressions by a decode trigger, during decoding", ["policy"])
        self.decode_slots_freed = Counter("kvpolicy:decode_slots_freed",
                                          "Slots recompressions during decoding gave back to the allocator",
                                          ["policy"])
        self.decode_seconds = Histogram("kvpolicy:decode_compression_seconds",
                                        "Seconds of one recompression during decoding", ["policy"],
                                        buckets=SECONDS_BUCKETS)

    def on_compressed(self, record) -> None:
        p = record.policy
        self.compressed.labels(p, record.layout).inc()
        self.prompt_tokens.labels(p).inc(record.prompt_tokens)
        self.slots_kept.labels(p).inc(record.slots_kept)
        self.slots_freed.labels(p).inc(record.slots_freed)
        self.slots_released.labels(p).inc(record.slots_released_to_tree)
        self.seconds.labels(p).observe(record.seconds)

    def on_recompressed(self, policy: str, slots_freed: int, seconds: float) -> None:
        self.decode_compressions.labels(policy).inc()
        self.decode_slots_freed.labels(policy).inc(slots_freed)
        self.decode_seconds.labels(policy).observe(seconds)

    def on_left_exact(self, reason: str) -> None:
        if reason not in LEFT_EXACT:
            raise ValueError(f"unknown reason {reason!r}")
        self.left_exact.labels(reason).inc()


_metrics: Metrics | None | bool = False  # False: not decided yet


def metrics() -> Metrics | None:
    """The process's metrics when SGLang collects them (``--enable-metrics``,
    decided once per process), else ``None``."""
    global _metrics
    if _metrics is False:
        _metrics = Metrics() if os.environ.get(ENV) else None
    return _metrics
