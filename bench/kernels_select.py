"""Bench cases for the selection and merge kernels, timed by
``bench/kernels.py`` beside its attention cases (it loads this file by path and
calls :func:`cases`).

    python bench/kernels.py                  # CUDA, full sizes: N = 32768, H_kv = 8, d = 128, budget 5%
    python bench/kernels.py --device cpu     # interpreted smoke sizes (not a speed figure)

Cases, each kernel against its pure-torch reference on the same arguments:

* ``pick_head``: per-head top-c (SnapKV) of ``[H_kv, N]`` scores;
* ``classify_cosine``: similarity / arg-max / threshold of every token against
  its head's centres (EMS), on keys where a third of the tokens sit near a centre;
* ``scatter``: the zero-class merge of those classes into ``[H_kv, K, d]``;
(SGLang's pool takes the compressed rows in fresh slots, so no compaction
kernel is needed; the one that existed was never reached and was removed.)
"""

from __future__ import annotations

from functools import partial

TINY = dict(n=100, kv_heads=2, head_dim=32, budget=0.2, sink=2, recent=4)
FULL = dict(n=32768, kv_heads=8, head_dim=128, budget=0.05, sink=4, recent=32)


def cases(device: str, scale: str) -> list[dict]:
    import torch

    from kvpolicy.exec.reference import merge as rmerge
    from kvpolicy.exec.reference import select as rselect
    from kvpolicy.kernels import merge as kmerge
    from kvpolicy.kernels import select as kselect
    from kvpolicy.lang import ir

    s = FULL if scale == "full" else TINY
    N, H, d = s["n"], s["kv_heads"], s["head_dim"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    es = torch.empty((), dtype=dtype).element_size()
    protect = ir.Protect(sink=s["sink"], recent=s["recent"])
    B = round(s["budget"] * N)
    c = B - protect.total
    head = ir.Selection("head", ir.KeepTop("s"))
    merge = ir.MergeSimilar()

    def layer():
        """Scores, keys with a third of the tokens near a centre, values, masks."""
        g = torch.Generator().manual_seed(0)
        scores = torch.rand(H, N, generator=g)
        protected = rselect.protected_mask(N, protect)
        picks = rselect.pick(head, scores, ~protected, c)
        centres = picks.mask(N)
        keys = torch.randn(H, N, d, generator=g)
        owner = picks.order.gather(1, torch.randint(0, c, (H, N), generator=g))
        near = torch.rand(H, N, 1, generator=g) < 1 / 3
        copy = keys.gather(1, owner[..., None].expand(H, N, d)) + 0.1 * torch.randn(H, N, d, generator=g)
        keys = torch.where(near, copy, keys)
        values = torch.randn(H, N, d, generator=g)
        on = [x.to(device) for x in (keys.to(dtype), values.to(dtype), scores, centres | protected, centres)]
        return (*on, protected.to(device))

    def picked(fn, scores, candidates, c):
        p = fn(head, scores, candidates, c)
        return p.order, p.counts

    def pick_args():
        g = torch.Generator().manual_seed(1)
        scores = torch.rand(H, N, generator=g).to(device)
        return scores, ~rselect.protected_mask(N, protect, device=device), c

    def classified(fn, *args):
        out = fn(*args)
        return out.class_id, out.weight

    def classify_args():
        keys, values, scores, kept, centres, protected = layer()
        return keys, values, scores, kept, centres, merge, protected

    def scatter_args():
        keys, values, scores, kept, centres, protected = layer()
        return keys, values, rmerge.classify(keys, values, scores, kept, centres, merge, protected)

    def scatter_bytes():
        classes = scatter_args()[2]
        K = classes.kept_positions.shape[1]
        rows = int(classes.merged.sum()) + H * K  # members read (merged + own), then K slots written
        return H * N * (8 + 4) + rows * 2 * d * es + H * K * 2 * d * es

    return [
        dict(name="pick_head", n=N, kernel=partial(picked, kselect.pick), reference=partial(picked, rselect.pick),
             bytes=H * N * 4 + N + H * c * 8, make_args=pick_args),
        dict(name="classify_cosine", n=N, kernel=partial(classified, kmerge.classify),
             reference=partial(classified, rmerge.classify),
             bytes=H * N * d * es + H * N * (4 + 1 + 1) + N + H * N * (8 + 4), make_args=classify_args),
        dict(name="scatter", n=N, kernel=kmerge.scatter, reference=rmerge.scatter, bytes=scatter_bytes(),
             make_args=scatter_args),
    ]
