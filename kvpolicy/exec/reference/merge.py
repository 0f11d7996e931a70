"""Classify the tokens that were not kept (merge or evict) and fold them in one
fixed-shape scatter with a zero class (EMS, arXiv 2412.08521).

EMS has no public code; the choices below are ours, each with its reason.

* Centres are the tokens picked by score. Protected tokens (sinks, the recent
  window) absorb nothing: folding other tokens into an attention sink would
  change the one token the model relies on being stable.
* A not-kept token is a *merge candidate* if its metric to its best centre
  passes the threshold (``cosine > t``, ``dot > t``, ``l2 < t`` on keys or
  values; ``kv``: the product ``cos(K) * cos(V)``, EMS's redundancy as its
  public reviews give it): redundancy decides the merge class size per head.
* ``cover=q`` (optional) also lets sparsity decide: going down the not-kept
  tokens by score, only those needed to bring the head's kept score mass up to
  ``q`` of its total may merge; the long tail of a sparse head carries no
  attention and would only blur its centres, so it is evicted whatever its
  similarity. Scores below 0 count as 0 mass.
* Merging is a weighted average within each class (the centre and its
  members), with weights = keep score (clamped at 0, plus 1e-6) or uniform.
  Keys merge direction and norm separately (the direction is the normalised
  weighted sum of unit keys, the norm the weighted mean of norms): a plain
  average of dissimilar vectors shrinks the norm and would lower every logit
  the merged key receives. Values are plainly averaged. A class with no
  members keeps its centre's K and V bit for bit.
* Evicted tokens go to class 0 with weight 0; all heads run one scatter into
  ``[H_kv, K + 1, d]`` and slot 0 is dropped, however each head splits its
  tokens between merge and evict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvpolicy.lang import ir

WEIGHT_FLOOR = 1e-6


@dataclass
class Classes:
    """Class id of every token per head: ``0`` evicted, ``1..K`` kept slot
    (slots in position order), and what the scatter weights them by."""

    class_id: Tensor  # [H_kv, N] long
    weight: Tensor  # [H_kv, N] fp32, 0 for evicted tokens
    kept_positions: Tensor  # [H_kv, K] long, -1 where a head keeps fewer than K
    merged: Tensor  # [H_kv] tokens folded into centres
    evicted: Tensor  # [H_kv] tokens dropped


def _similarity(x: Tensor, centres: Tensor, metric: str) -> Tensor:
    """``[H, N, d] x [H, C, d] -> [H, N, C]``; larger is more similar (l2 is negated)."""
    x, centres = x.float(), centres.float()
    if metric == "l2":
        return -torch.cdist(x, centres)
    if metric == "cosine":
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        centres = centres / centres.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.bmm(x, centres.transpose(1, 2))  # 30% faster than the same einsum at [3, 4096, 410]


SIMILARITY_ROWS = 256  # tokens per block of the similarity product (below)


def _best_centres(vectors: tuple[Tensor, ...], centre_vectors: list[Tensor], invalid: Tensor,
                  metric: str) -> tuple[Tensor, Tensor]:
    """Each token's most similar centre: ``(best_sim, best)`` ``[H, N]``, the
    product of the similarities over ``vectors`` (``[H, N, d]`` each, against
    ``centre_vectors [H, C, d]``), centres where ``invalid [H, C]`` excluded.

    ``SIMILARITY_ROWS`` tokens at a time, so that each ``[H, rows, C]`` block
    of the product stays in cache between its matmuls, product, mask and max:
    at ``[3, 4096, 410]`` on 2 CPU cores (SmolLM2's KV heads, 4k tokens, 10%
    kept) 14 ms against 35 ms for the whole ``[H, N, C]`` at once; 128 and 512
    rows were within 1 ms of 256, 1024 rows 17 ms."""
    N = vectors[0].shape[1]
    masked = bool(invalid.any())  # heads keeping fewer centres than the most
    best_sim = torch.empty(invalid.shape[0], N, dtype=torch.float32, device=invalid.device)
    best = torch.empty(invalid.shape[0], N, dtype=torch.long, device=invalid.device)
    for start in range(0, N, SIMILARITY_ROWS):
        rows = slice(start, start + SIMILARITY_ROWS)
        sim = None
        for x, centres in zip(vectors, centre_vectors):
            part = _similarity(x[:, rows], centres, metric)
            sim = part if sim is None else sim.mul_(part)
        if masked:
            sim.masked_fill_(invalid[:, None, :], float("-inf"))
        torch.max(sim, dim=-1, out=(best_sim[:, rows], best[:, rows]))
    return best_sim, best


def merge_vectors(keys: Tensor, values: Tensor, merge: ir.MergeSimilar) -> tuple[Tensor, ...]:
    """The vectors whose similarities are multiplied: keys, values, or both
    (``kv``: EMS's redundancy ``cos(K) * cos(V)`` from its public reviews)."""
    return {"keys": (keys,), "values": (values,), "kv": (keys, values)}[merge.target]


def classify(keys: Tensor, values: Tensor, scores: Tensor, kept: Tensor, centres: Tensor,
             merge: ir.MergeSimilar | None, protected: Tensor) -> Classes:
    """``kept``/``centres`` ``[H_kv, N]`` bool masks (centres are a subset of
    kept); ``protected`` ``[N]``. Returns every token's class."""
    H, N = kept.shape
    slot_of, kept_positions = kept_slots(kept)
    class_id = slot_of.clone()
    if merge is not None and centres.any():
        cols = torch.arange(N, device=keys.device)[None, :].expand(H, N)
        C = int(centres.sum(dim=1).max())
        centre_pos = torch.sort(torch.where(centres, cols, N), dim=1).values[:, :C]  # padded with N
        valid_centre = centre_pos < N
        vectors = merge_vectors(keys, values, merge)
        centre_vectors = [x.gather(1, centre_pos.clamp_max(N - 1)[..., None].expand(H, C, x.shape[-1]))
                          for x in vectors]
        best_sim, best = _best_centres(vectors, centre_vectors, ~valid_centre, merge.metric)
        # l2 similarity is the negated distance: distance < t  <=>  -distance > -t.
        # A head without centres has best_sim = -inf and merges nothing.
        passes = best_sim > (-merge.threshold if merge.metric == "l2" else merge.threshold)
        eligible = ~kept & ~protected[None, :] & passes
        if merge.cover is not None:
            eligible &= _within_cover(scores, kept, protected, merge.cover)
        best_pos = centre_pos.gather(1, best)
        class_id = torch.where(eligible, slot_of.gather(1, best_pos.clamp_max(N - 1)), class_id)
    return classes_from_ids(class_id, kept, kept_positions, scores, merge)


def kept_slots(kept: Tensor) -> tuple[Tensor, Tensor]:
    """Slot numbering of the kept tokens, in position order: ``slot_of [H, N]``
    (``1..K`` at kept tokens, ``0`` elsewhere) and ``kept_positions [H, K]``
    (``-1`` past a head's count)."""
    H = kept.shape[0]
    K = int(kept.sum(dim=1).max()) if H else 0
    slot_of = kept.long().cumsum(dim=1) * kept
    rows, cols = kept.nonzero(as_tuple=True)
    kept_positions = torch.full((H, K), -1, dtype=torch.long, device=kept.device)
    kept_positions[rows, slot_of[rows, cols] - 1] = cols
    return slot_of, kept_positions


def classes_from_ids(class_id: Tensor, kept: Tensor, kept_positions: Tensor, scores: Tensor,
            merge: ir.MergeSimilar | None) -> Classes:
    """:class:`Classes` from every token's class id: the scatter weights, and
    the merged (folded into a centre) and evicted counts per head."""
    if merge is not None and merge.weight == "uniform":
        weight = torch.ones(class_id.shape, dtype=torch.float32, device=class_id.device)
    else:
        weight = scores.float().clamp_min(0) + WEIGHT_FLOOR
    weight = weight * (class_id > 0)
    merged = ((class_id > 0) & ~kept).sum(dim=1)
    evicted = (class_id == 0).sum(dim=1)
    return Classes(class_id, weight, kept_positions, merged, evicted)


def _within_cover(scores: Tensor, kept: Tensor, protected: Tensor, cover: float) -> Tensor:
    """``[H, N]`` bool: not-kept tokens within the head's first ``cover`` of
    score mass, counting the kept tokens' mass first."""
    mass = scores.float().clamp_min(0).masked_fill(protected[None, :], 0.0)
    total = mass.sum(dim=1, keepdim=True)
    covered = (mass * kept).sum(dim=1, keepdim=True)
    rest = mass.masked_fill(kept, -1.0)
    order = torch.sort(rest, dim=1, descending=True, stable=True).indices
    before = (mass.gather(1, order) * (~kept).gather(1, order)).cumsum(dim=1) - mass.gather(1, order)
    allowed_sorted = covered + before < cover * total
    allowed = torch.zeros_like(kept)
    allowed.scatter_(1, order, allowed_sorted)
    return allowed & ~kept


def scatter(keys: Tensor, values: Tensor, classes: Classes) -> tuple[Tensor, Tensor]:
    """One fixed-shape scatter into ``[H_kv, K + 1, d]``; slot 0 (the zero class)
    is dropped. Returns ``(keys, values)`` of shape ``[H_kv, K, d]`` in the
    input dtype; unused slots (heads keeping fewer than ``K``) are zero.

    Where no token merged (no ``merge`` clause, or none passed it) every
    class is its centre alone, which keeps its token bit for bit: the kept
    tokens are gathered, without the scatter over all ``N``: H2O's compact
    step over 30 layers at 4k tokens, 10% kept, 2 CPU cores, took 176 ms
    with the scatter and 15 ms gathered (``python bench/compression_steps.py
    --policy h2o``)."""
    if not bool(classes.merged.any()):
        return kept_tokens(keys, values, classes.kept_positions)
    H, N, d = keys.shape
    K = classes.kept_positions.shape[1]
    idx = classes.class_id[..., None].expand(H, N, d)
    w = classes.weight[..., None]
    k = keys.float()
    norm = k.norm(dim=-1, keepdim=True)
    unit = k / norm.clamp_min(1e-12)
    z = lambda: torch.zeros(H, K + 1, d, dtype=torch.float32, device=keys.device)  # noqa: E731
    dir_sum = z().scatter_add_(1, idx, w * unit)
    norm_sum = torch.zeros(H, K + 1, 1, device=keys.device).scatter_add_(1, classes.class_id[..., None], w * norm)
    val_sum = z().scatter_add_(1, idx, w * values.float())
    w_sum = torch.zeros(H, K + 1, 1, device=keys.device).scatter_add_(1, classes.class_id[..., None], w)
    members = torch.zeros(H, K + 1, dtype=torch.long, device=keys.device).scatter_add_(
        1, classes.class_id, torch.ones_like(classes.class_id))
    w_sum = w_sum[:, 1:].clamp_min(1e-30)
    merged_k = dir_sum[:, 1:] / dir_sum[:, 1:].norm(dim=-1, keepdim=True).clamp_min(1e-30) * (norm_sum[:, 1:] / w_sum)
    merged_v = val_sum[:, 1:] / w_sum

    # classes of one member keep their token exactly
    orig_k, orig_v = kept_tokens(keys, values, classes.kept_positions)
    alone = (members[:, 1:] == 1)[..., None]
    valid = (classes.kept_positions >= 0)[..., None]
    out_k = torch.where(alone, orig_k, merged_k.to(keys.dtype)) * valid
    out_v = torch.where(alone, orig_v, merged_v.to(values.dtype)) * valid
    return out_k, out_v


def kept_tokens(keys: Tensor, values: Tensor, kept_positions: Tensor) -> tuple[Tensor, Tensor]:
    """The tokens at ``kept_positions [H_kv, K]`` (``-1``: an unused slot,
    zero): what :func:`scatter` gives when no token merged, and the centres
    that keep their token when their class has no other member."""
    H, K = kept_positions.shape
    d = keys.shape[-1]
    pos = kept_positions.clamp_min(0)[..., None]
    valid = (kept_positions >= 0)[..., None]
    return (torch.where(valid, keys.gather(1, pos.expand(H, K, d)), 0),
            torch.where(valid, values.gather(1, pos.expand(H, K, values.shape[-1])), 0))
