"""Protect, allocate and classify: which tokens each KV head keeps.

Input: the keep score ``[H_kv, N]`` of one layer, the layer budget ``B_l``
(tokens per KV head, protected ones included) and the protected set. Output:
per head, the positions kept (protected + picked), sorted by position, and
which of them were picked by score (the class centres a merge folds into).

Ties are broken by position (earlier first), so selection is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvpolicy.lang import ir


def protected_mask(num_tokens: int, protect: ir.Protect, device=None) -> Tensor:
    """``[N]`` bool: the first ``sink`` and last ``recent`` tokens."""
    mask = torch.zeros(num_tokens, dtype=torch.bool, device=device)
    mask[: min(protect.sink, num_tokens)] = True
    if protect.recent:
        mask[max(num_tokens - protect.recent, 0):] = True
    return mask


@dataclass
class Picks:
    """Picked (scored) tokens per KV head: ``order [H_kv, c_max]`` positions in
    descending score order, ``counts [H_kv]`` how many are valid per head."""

    order: Tensor
    counts: Tensor

    def mask(self, num_tokens: int) -> Tensor:
        """``[H_kv, N]`` bool: True at picked positions."""
        H = self.order.shape[0]
        out = torch.zeros(H, num_tokens, dtype=torch.bool, device=self.order.device)
        valid = torch.arange(self.order.shape[1], device=self.order.device)[None, :] < self.counts[:, None]
        rows = torch.arange(H, device=self.order.device)[:, None].expand_as(self.order)
        out[rows[valid], self.order[valid]] = True
        return out


def _ranked(scores: Tensor, candidates: Tensor) -> Tensor:
    """Positions per head by descending score; protected tokens last; ties by position."""
    masked = scores.masked_fill(~candidates, float("-inf"))
    return torch.sort(masked, dim=-1, descending=True, stable=True).indices


def pick(selection: ir.Selection, scores: Tensor, candidates: Tensor, c: int) -> Picks:
    """``c`` picks per head (the budget left after the protected tokens).

    * ``head``: each KV head its own top ``c`` (SnapKV, arXiv 2404.14469);
    * ``layer``: the top ``c`` of the head-averaged score, shared (CompressKV);
    * ``pooled``: each head first takes its own top ``floor(alpha * c)``; the
      remaining ``H_kv * (c - floor(alpha * c))`` go to the best remaining
      scores of any head of the layer (AdaKV, arXiv 2407.11550, with safeguard
      ``alpha``; the total is exactly ``H_kv * c``, as kvpress realises it).
    """
    H, N = scores.shape
    device = scores.device
    if selection.unit == "layer":
        order = _ranked(scores.mean(dim=0, keepdim=True), candidates)[:, :c].expand(H, c).contiguous()
        counts = torch.full((H,), c, dtype=torch.long, device=device)
    elif selection.unit == "head":
        order = _ranked(scores, candidates)[:, :c]
        counts = torch.full((H,), c, dtype=torch.long, device=device)
    else:
        floor = int(selection.safeguard * c)
        ranked = _ranked(scores, candidates)  # [H, N]
        rest_pos = ranked[:, floor:]  # every head's tokens after its guaranteed ones
        rest_scores = scores.gather(1, rest_pos).masked_fill(~candidates[rest_pos], float("-inf"))
        flat = torch.sort(rest_scores.flatten(), descending=True, stable=True).indices[: H * (c - floor)]
        won = torch.zeros(H * rest_pos.shape[1], dtype=torch.bool, device=device)
        won[flat] = True
        won = won.view(H, -1)
        counts = floor + won.sum(dim=1)
        c_max = int(counts.max()) if H else 0
        order = torch.full((H, c_max), -1, dtype=torch.long, device=device)
        for_head = torch.cat([ranked[:, :floor], rest_pos], dim=1)
        keep_flag = torch.cat([torch.ones(H, floor, dtype=torch.bool, device=device), won], dim=1)
        # keep_flag rows are True for exactly counts[h] entries, already in score order
        slot = keep_flag.cumsum(dim=1) - 1
        rows = torch.arange(H, device=device)[:, None].expand_as(for_head)
        order[rows[keep_flag], slot[keep_flag]] = for_head[keep_flag]
    if selection.keep.p is not None:
        counts = _top_p_counts(scores, candidates, order, counts, selection.keep.p)
    return Picks(order, counts)


def _top_p_counts(scores: Tensor, candidates: Tensor, order: Tensor, counts: Tensor, p: float) -> Tensor:
    """Per head, the shortest prefix of its picks whose score mass reaches ``p``
    of the head's candidate mass (scores below 0 count as 0), never more than
    it had."""
    mass = scores.clamp_min(0).masked_fill(~candidates, 0.0)
    total = mass.sum(dim=1, keepdim=True)
    picked = mass.gather(1, order.clamp_min(0))
    valid = torch.arange(order.shape[1], device=order.device)[None, :] < counts[:, None]
    cum = (picked * valid).cumsum(dim=1)
    reached = (cum >= p * total) & valid
    first = torch.where(reached.any(dim=1), reached.float().argmax(dim=1) + 1, counts)
    return torch.minimum(first, counts)
