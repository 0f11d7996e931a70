"""Where a compressed request's kept tokens live in SGLang's pool when its
layers and KV heads keep different numbers of tokens (ARCHITECTURE.md §
Variable budgets: the flattened-row layout).

SGLang's pool gives each layer ``l`` a key buffer ``[S, H_kv, d]`` (and a
value buffer): slot ``s`` owns one *row* ``(l, s, h)`` per layer and KV head,
``L * H_kv`` rows in all. A compressed request whose layer ``l``, head ``h``
keeps ``B[l, h]`` tokens needs ``R = sum B`` rows, so

    slots = ceil(R / (L * H_kv))

slots hold its prompt: any row of any of its slots may hold any of its
(layer, head) tokens. Rows are handed out in the order (layer, head, slot)
and the tokens in the order (layer, head, rank): when every layer and head
keeps the same ``B`` this is the rank-slot layout exactly (slot ``j`` holds
every head's ``j``-th kept token in every layer), which SGLang's own
attention reads; otherwise each (layer, head) has its own list of rows,
mostly in its own layer and head, spilling into the next ones where its
budget is larger than the average.

A row is named by one integer, ``(l * S + s) * H_kv + h``. Tokens decoded
after compression are written by SGLang into fresh slots as usual (all
layers and heads of a slot), so a (layer, head) reads its rows, then the
request's decoded slots in that layer.

Pure torch over the pool's buffers: unit-tested without SGLang.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def slots_needed(counts: Tensor) -> int:
    """Slots that hold ``counts [L, H_kv]`` kept tokens: ``ceil(sum / (L * H_kv))``."""
    L, H = counts.shape
    return -(-int(counts.sum()) // (L * H))


def is_rank_slot(counts: Tensor) -> bool:
    """Whether every layer and head keeps the same number of tokens: the
    layout is then rank-slot, read by SGLang's own attention."""
    return bool((counts == counts.reshape(-1)[0]).all())


@dataclass
class RowLayout:
    """One request's compressed prompt: its slots and every (layer, head)'s rows.

    slots: ``[n]`` the pool slots it holds for its prompt;
    counts: ``[L, H_kv]`` tokens kept per layer and head;
    rows: per layer ``[H_kv, max_h counts[l]]`` row ids, ``-1`` past a head's count;
    uniform: every layer and head keeps ``n`` tokens (the rank-slot layout:
    SGLang's own attention reads it, no row lists are needed).
    """

    slots: Tensor
    counts: Tensor
    rows: list[Tensor]
    uniform: bool

    @property
    def rows_per_layer(self) -> list[int]:
        return [int(c) for c in self.counts.sum(dim=1)]


def assign(counts: Tensor, slots: Tensor, pool_slots: int) -> RowLayout:
    """The rows of ``slots`` (a pool of ``pool_slots`` slots per layer) for
    tokens kept ``counts [L, H_kv]`` per layer and head; ``len(slots)`` must be
    :func:`slots_needed`."""
    L, H = counts.shape
    n = slots.numel()
    if n != slots_needed(counts):
        raise ValueError(f"{n} slots for {int(counts.sum())} rows; {slots_needed(counts)} needed")
    slots = slots.to(torch.long).cpu()
    layer = torch.arange(L)[:, None, None]
    head = torch.arange(H)[None, :, None]
    supply = ((layer * pool_slots + slots[None, None, :]) * H + head).reshape(-1)  # (layer, head, slot) order
    flat = counts.reshape(-1).to(torch.long).cpu()
    starts = torch.cumsum(flat, 0) - flat
    rows = []
    for lid in range(L):
        K = int(counts[lid].max())
        table = torch.full((H, K), -1, dtype=torch.long)
        for h in range(H):
            c, s0 = int(flat[lid * H + h]), int(starts[lid * H + h])
            table[h, :c] = supply[s0:s0 + c]
        rows.append(table)
    return RowLayout(slots, counts.to(torch.long).cpu(), rows, is_rank_slot(counts))


def _split(rows: Tensor, pool_slots: int, H: int) -> tuple[Tensor, Tensor]:
    """Row ids -> (layer, row within that layer's ``[S * H_kv, d]`` view)."""
    per_layer = pool_slots * H
    return rows // per_layer, rows % per_layer


def write(k_buffers, v_buffers, layout: RowLayout, kept: list[tuple[Tensor, Tensor]]) -> None:
    """Store each layer's kept keys and values (``[H_kv, K_l, d]``, head
    ``h``'s first ``counts[l, h]`` valid) in the layout's rows."""
    S, H = k_buffers[0].shape[0], k_buffers[0].shape[1]
    ids, ks, vs = [], [], []
    for lid, (k, v) in enumerate(kept):
        valid = layout.rows[lid] >= 0
        ids.append(layout.rows[lid][valid])
        dev = k.device
        ks.append(k[:, :valid.shape[1]][valid.to(dev)])
        vs.append(v[:, :valid.shape[1]][valid.to(dev)])
    ids, ks, vs = torch.cat(ids), torch.cat(ks), torch.cat(vs)
    src, local = _split(ids, S, H)
    for lid in torch.unique(src).tolist():
        pick = src == lid
        at = local[pick].to(k_buffers[lid].device)
        k_buffers[lid].view(S * H, -1)[at] = ks[pick.to(ks.device)].to(k_buffers[lid].dtype)
        v_buffers[lid].view(S * H, -1)[at] = vs[pick.to(vs.device)].to(v_buffers[lid].dtype)


@dataclass
class LayerReader:
    """How one layer of a layout is gathered: per source layer, which
    positions of the flat ``[H_kv * K]`` table its rows fill."""

    shape: tuple[int, int]  # (H_kv, K)
    parts: list[tuple[int, Tensor, Tensor]]  # (source layer, positions in the table, rows in that layer)
    kept: Tensor  # [H_kv] tokens kept per head


def readers(layout: RowLayout, pool_slots: int, device) -> list[LayerReader]:
    """Precomputed once per request, on the pool's device."""
    out = []
    for lid, table in enumerate(layout.rows):
        H, _ = table.shape
        flat = table.reshape(-1)
        positions = torch.nonzero(flat >= 0).squeeze(1)
        src, local = _split(flat[positions], pool_slots, H)
        parts = [(int(s), positions[src == s].to(device), local[src == s].to(device))
                 for s in torch.unique(src).tolist()]
        out.append(LayerReader(tuple(table.shape), parts, layout.counts[lid].to(device)))
    return out


def gather(buffer, reader: LayerReader, pool_slots: int) -> Tensor:
    """``[H_kv, K, d]`` of one layer's kept rows (zeros past each head's
    count); ``buffer(l)`` is layer ``l``'s ``[S, H_kv, d]`` pool buffer."""
    H, K = reader.shape
    like = buffer(reader.parts[0][0] if reader.parts else 0)
    out = torch.zeros(H * K, like.shape[-1], dtype=like.dtype, device=like.device)
    for src, positions, local in reader.parts:
        out[positions] = buffer(src).view(pool_slots * H, -1)[local]
    return out.view(H, K, like.shape[-1])


def decode_attention(q: Tensor, layer: int, reader: LayerReader, decoded: Tensor, keys, values, pool_slots: int,
                     scale: float, logit_cap: float, attend) -> Tensor:
    """One decode query ``q [H, d]`` of a compressed request in layer
    ``layer``: each KV head reads its kept rows, then the request's slots
    ``decoded`` (written by SGLang since compression, the current token's
    included). ``keys(l)`` / ``values(l)`` give layer ``l``'s pool buffers;
    ``attend`` is :func:`kvpolicy.exec.reference.attention.split_decode_attention`
    or the Triton kernel of the same signature. Returns ``[H, d_v]`` fp32."""
    H_kv, K = reader.shape
    k = torch.cat([gather(keys, reader, pool_slots), keys(layer)[decoded].transpose(0, 1)], dim=1)
    v = torch.cat([gather(values, reader, pool_slots), values(layer)[decoded].transpose(0, 1)], dim=1)
    H, d = q.shape
    T = decoded.numel()
    split = torch.full((H_kv,), K, dtype=torch.long, device=k.device)
    out = attend(q.view(H_kv, H // H_kv, d), k, v, reader.kept, split, split + T, scale, logit_cap)
    return out.reshape(H, -1)
