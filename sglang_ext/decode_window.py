"""Decode-time recompression's per-request state: the policy's trigger
``every N tokens`` (ARCHITECTURE.md § Compressing during decoding).

A request whose policy has a decode trigger keeps, per layer, its last ``W``
post-RoPE queries in a ring buffer: the prompt's last ``W`` (from the
prefill's capture) and then each decode step's, so the observation window of
``local()`` slides with the generation exactly as on the transformers path
(:func:`kvpolicy.hf.generate.feed`). Every ``N`` decoded tokens the runtime
checks the request; over its budget, its whole private KV is compressed
again, in place (:meth:`kvpolicy.sglang_ext.runtime.Runtime.recompress_batch`).

Timing. A check runs where SGLang processes the result of the decode step
that fed the ``N``-th token since the last check, before the next step of
that request is launched:

* ``ran`` counts the decode forwards that included the request (noted as
  each ForwardBatch is built), ``done`` the results processed; a check runs
  only when they are equal, i.e. on the latest forward's result;
* with the overlap scheduler the next step is prepared (its slot allocated,
  its length counted) before the last result is processed; when a check is
  due after that result, :meth:`DecodeWindows.due_before_next` makes the
  scheduler process it before launching the next step (one lost overlap per
  check), and the prepared slot moves with the recompression, as at prefill.

So the check sees the KV of exactly the tokens fed so far, and the next
token attends the recompressed cache, as :func:`~kvpolicy.hf.generate.feed`
does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvpolicy.exec.pipeline import Pipeline
from kvpolicy.lang import ir


@dataclass
class DecodeWindow:
    """One request with a decode trigger."""

    rid: str
    policy: ir.Policy
    pipeline: Pipeline  # planned for the prompt: the layer budgets recompression keeps
    every: int  # N: decoded tokens between two checks
    checked_len: int  # physical length (slots written) at the last check or compression
    ran_len: int  # physical length after the last decode forward that ran with the request
    ring: list = field(default_factory=list)  # per layer [H, W, d], ring order (oldest at ran % W)
    ran: int = 0  # decode forwards that included it
    done: int = 0  # their results processed
    checks: int = 0
    recompressions: int = 0
    most_slots: int = 0  # the most slots it held at a check (written + a prepared step)

    @property
    def window(self) -> int:
        return self.ring[0].shape[1] if self.ring else 0

    def push(self, lid: int, q: torch.Tensor) -> None:
        """Layer ``lid``'s query ``[H, d]`` of the decode step now running."""
        if self.ring:
            self.ring[lid][:, (self.ran - 1) % self.window] = q

    def queries(self, lid: int) -> torch.Tensor | None:
        """Layer ``lid``'s last ``W`` queries, oldest first."""
        if not self.ring:
            return None
        return torch.roll(self.ring[lid], -(self.ran % self.window), dims=1)

    def due(self) -> bool:
        return self.ran_len - self.checked_len >= self.every

    def due_now(self) -> bool:
        """A check is due on the result being processed (the latest forward's)."""
        return self.ran == self.done and self.due()


class DecodeWindows:
    """The requests with a decode trigger, and which rows of the current
    decode forward they are."""

    def __init__(self):
        self.windows: dict[str, DecodeWindow] = {}
        self.rows: list[tuple[int, DecodeWindow]] | None = None  # (row, window) of the current decode forward

    def __len__(self) -> int:
        return len(self.windows)

    def get(self, rid: str) -> DecodeWindow | None:
        return self.windows.get(rid)

    def pop(self, rid: str) -> DecodeWindow | None:
        return self.windows.pop(rid, None)

    def start(self, rid: str, policy: ir.Policy, pipeline: Pipeline, queries: list, length: int) -> DecodeWindow:
        """A request whose prefill ended with ``length`` slots written; its
        ring starts from the prompt's last queries (``queries[l]`` ``[H, W, d]``)."""
        ring = [q.clone() for q in queries] if pipeline.window else []
        w = DecodeWindow(rid, policy, pipeline, policy.trigger.decode_every, length, length, ring)
        self.windows[rid] = w
        return w

    def begin_forward(self, batch, forward_batch) -> None:
        """As a decode ForwardBatch is built: count the step for each request
        with a decode trigger and note its row."""
        self.rows = None
        if not self.windows or not forward_batch.forward_mode.is_decode():
            return
        lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens.cpu()
        rows = []
        for i, req in enumerate(batch.reqs):
            w = self.windows.get(req.rid)
            if w is not None:
                w.ran += 1
                w.ran_len = int(lens[i])
                rows.append((i, w))
        self.rows = rows or None

    def on_attention(self, layer, q: torch.Tensor) -> None:
        """Each layer of a decode forward: the requests' queries into their rings."""
        qs = q.reshape(q.shape[0], layer.tp_q_head_num, -1)
        for i, w in self.rows:
            w.push(layer.layer_id, qs[i])

    def due_before_next(self) -> bool:
        """Whether a check is due on a result not yet processed (its forward
        is the request's latest): the overlap scheduler must then process it
        before launching the next step."""
        return any(w.ran == w.done + 1 and w.due() for w in self.windows.values())
