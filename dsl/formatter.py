"""IR -> canonical policy text. ``parse(format_policy(p)) == p`` for every policy.

The canonical form puts statements in a fixed order (policy, description,
budget, keep, scores, per block, layers, overrides, trigger), writes
defaults explicitly where they help a reader (``layers uniform``, ``evict
rest``) and leaves out what is implied (``trigger prefill``). Comments are
not part of the IR, so ``kvpolicy fmt`` keeps a file's leading comment block
(its header) and drops the rest.
"""

from __future__ import annotations

import json

from kvpolicy import ir


def number(x: float) -> str:
    """Shortest text that reads back as the same float (``2`` for 2.0)."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


def string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def budget(b: ir.Budget) -> str:
    out = f"{number(b.amount)} tokens" if b.unit == "tokens" else f"{number(b.amount)}%"
    if b.floor is not None:
        out += f", floor {b.floor}"
    if b.cap is not None:
        out += f", cap {b.cap}"
    return out


def heads(h: ir.Heads) -> str:
    if isinstance(h, ir.AllHeads):
        return "all"
    args = ([string(h.artifact)] if h.artifact is not None else []) + [f"top={h.top}"]
    return f"retrieval({', '.join(args)})"


def expr(e: ir.ScoreExpr) -> str:
    if isinstance(e, ir.ScoreRef):
        return e.name
    if isinstance(e, ir.GlobalAttention):
        opts = []
        if e.norm != "sum":
            opts.append(f"norm={e.norm}")
        opts += _head_opts(e)
        return f"global({', '.join(opts)})"
    if isinstance(e, ir.LocalAttention):
        opts = [f"window={e.window}"]
        if e.pool is not None:
            opts.append(f"pool={e.pool.kind}({e.pool.size})")
        opts += _head_opts(e)
        return f"local({', '.join(opts)})"
    if isinstance(e, ir.KeyNorm):
        return "key_norm()"
    if isinstance(e, ir.ValueNorm):
        return "value_norm()"
    if isinstance(e, ir.Recency):
        return "recency()"
    if isinstance(e, ir.Normalize):
        return f"{e.kind}({', '.join(expr(a) for a in e.args)})"
    if isinstance(e, ir.WeightedSum):
        return _sum(e)
    raise TypeError(f"not a score expression: {e!r}")


def _head_opts(e) -> list[str]:
    opts = []
    if not isinstance(e.heads, ir.AllHeads):
        opts.append(f"heads={heads(e.heads)}")
    if e.gqa != "mean":
        opts.append(f"gqa={e.gqa}")
    return opts


def _sum(e: ir.WeightedSum) -> str:
    def atom(t: ir.ScoreExpr) -> str:
        return f"({expr(t)})" if isinstance(t, ir.WeightedSum) else expr(t)

    if len(e.terms) == 1:  # a lone term keeps its weight visible, even 1
        w, t = e.terms[0]
        if w == -1:
            return f"-{atom(t)}"
        return f"{'-' if w < 0 else ''}{number(abs(w))} * {atom(t)}"
    parts = []
    for i, (w, t) in enumerate(e.terms):
        sign = "-" if w < 0 else "+"
        mag = abs(w)
        body = atom(t) if mag == 1 else f"{number(mag)} * {atom(t)}"
        if i == 0:
            parts.append(f"-{body}" if sign == "-" else body)
        else:
            parts.append(f" {sign} {body}")
    return "".join(parts)


def selection(s: ir.Selection) -> list[str]:
    unit = "head pooled(safeguard=%s)" % number(s.safeguard) if s.unit == "pooled" else s.unit
    keep = f"keep top {s.keep.score}" + (f", p={number(s.keep.p)}" if s.keep.p is not None else "")
    lines = [f"per {unit} {{", f"  {keep}"]
    if s.merge is not None:
        m = s.merge
        line = f"  merge similar({m.target}, {m.metric} {m.op} {number(m.threshold)}) into centers"
        if m.weight != "score":
            line += f", weight={m.weight}"
        lines.append(line)
    lines.append("  evict rest" + (" into zero_class" if s.evict.into == "zero_class" else ""))
    lines.append("}")
    return lines


def layers(sch: ir.LayerSchedule) -> str:
    if isinstance(sch, ir.Uniform):
        return "uniform"
    if isinstance(sch, ir.Pyramid):
        return f"pyramid(beta={number(sch.beta)})"
    if isinstance(sch, ir.Explicit):
        return "[" + ", ".join(str(w) for w in sch.weights) + "]"
    if isinstance(sch, ir.Adaptive):
        return f"adaptive({string(sch.artifact) if sch.artifact is not None else ''})"
    raise TypeError(f"not a layer schedule: {sch!r}")


def layer_ranges(indices: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2, 5"``."""
    out, i = [], 0
    idx = sorted(indices)
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ", ".join(out)


def format_policy(p: ir.Policy, header: str = "") -> str:
    """Canonical text of ``p``; ``header`` (comment lines) is printed first."""
    lines = [header.rstrip("\n")] if header.strip() else []
    lines.append(f"policy {p.name}")
    if p.description:
        lines.append(f"description {string(p.description)}")
    lines.append(f"budget {budget(p.budget)}")
    protect = [f"{k} {getattr(p.protect, k)}" for k in ("sink", "recent") if getattr(p.protect, k)]
    if protect:
        lines.append("keep " + ", ".join(protect))
    for d in p.scores:
        lines.append(f"score {d.name} = {expr(d.expr)}")
    if p.selection is not None:
        lines += selection(p.selection)
    lines.append(f"layers {layers(p.layers)}")
    for ov in p.overrides:
        lines.append(f"layer {layer_ranges(ov.layers)} budget {budget(ov.budget)}")
    if p.trigger != ir.Trigger():
        items = (["prefill"] if p.trigger.prefill else []) + (
            [f"every {p.trigger.decode_every} tokens"] if p.trigger.decode_every is not None else []
        )
        lines.append("trigger " + ", ".join(items))
    return "\n".join(lines) + "\n"


def leading_comments(text: str) -> str:
    """The comment block at the top of a file (kept by ``kvpolicy fmt``)."""
    out = []
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and out):
            out.append(line.rstrip())
        else:
            break
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out) + ("\n" if out else "")
