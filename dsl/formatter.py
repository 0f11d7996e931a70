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

from kvpolicy.lang import ir
from kvpolicy.lang.errors import source_lines


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
    if isinstance(e, ir.Redundancy):
        return "redundancy()" if e.threshold == ir.Redundancy().threshold else f"redundancy(threshold={number(e.threshold)})"
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
        if m.cover is not None:
            line += f", cover={number(m.cover)}"
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


ORDER = ("policy", "description", "extends", "budget", "keep", "score", "per", "layers", "layer", "trigger")


def statement(kind: str, value) -> list[str]:
    """The canonical line(s) of one statement."""
    if kind == "policy":
        return [f"policy {value}"]
    if kind == "description":
        return [f"description {string(value)}"]
    if kind == "extends":
        target, is_path = value
        return [f"extends {string(target) if is_path else target}"]
    if kind == "budget":
        return [f"budget {budget(value)}"]
    if kind == "keep":
        return ["keep " + ", ".join(f"{k} {getattr(value, k)}" for k in ("sink", "recent") if getattr(value, k))]
    if kind == "score":
        return [f"score {value.name} = {expr(value.expr)}"]
    if kind == "per":
        return selection(value)
    if kind == "layers":
        return [f"layers {layers(value)}"]
    if kind == "layer":
        return [f"layer {layer_ranges(value.layers)} budget {budget(value.budget)}"]
    if kind == "trigger":
        items = (["prefill"] if value.prefill else []) + (
            [f"every {value.decode_every} tokens"] if value.decode_every is not None else []
        )
        return ["trigger " + ", ".join(items)]
    raise ValueError(kind)


def format_policy(p: ir.Policy) -> str:
    """Canonical text of ``p`` (flattened: no ``extends``, no comments)."""
    parts: list[tuple[str, object]] = [("policy", p.name)]
    if p.description:
        parts.append(("description", p.description))
    parts.append(("budget", p.budget))
    if p.protect.total:
        parts.append(("keep", p.protect))
    parts += [("score", d) for d in p.scores]
    if p.selection is not None:
        parts.append(("per", p.selection))
    parts.append(("layers", p.layers))
    parts += [("layer", ov) for ov in p.overrides]
    if p.trigger != ir.Trigger():
        parts.append(("trigger", p.trigger))
    return "".join(line + "\n" for kind, value in parts for line in statement(kind, value))


# --------------------------------------------------------------------------- kvpolicy fmt


def _split_comment(line: str) -> tuple[str, str | None]:
    """``'budget 2%  # two'`` -> (``'budget 2%'``, ``'# two'``); '#' inside a string is text."""
    in_string = escaped = False
    for i, ch in enumerate(line):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "#":
            return line[:i].rstrip(), line[i:].rstrip()
    return line.rstrip(), None


def format_source(text: str, file: str | None = None) -> str:
    """Canonical text of a policy *file*: its own statements in canonical
    order, ``extends`` kept, comments kept with the statement they sit on or
    above (inside a ``per`` block, with the class line they sit on or above).
    The file must be a valid policy: it is parsed in full first."""
    from kvpolicy.dsl.parser import parse, read_document

    parse(text, file)
    doc = read_document(text, file)
    split = [_split_comment(l) for l in source_lines(text)]

    # Anchors are (line, column) of statements and class lines; a closing brace
    # is (line, INF). Comments attach to anchors; output lines carry anchors.
    INF = 10**9
    pieces: list[tuple[str, object, list]] = []
    alias: dict = {}  # anchor of an override line merged into another's output line -> that one
    starts: list[tuple[int, int]] = []  # top-level statement anchors
    blocks: list[tuple[int, int, tuple, list]] = []  # (first line, last line, its anchor, anchors inside)
    for kind in ORDER:
        if kind == "score":
            for sl in doc.scores.values():
                pieces.append(("score", sl.value, [(sl.span[0], sl.column)]))
                starts.append((sl.span[0], sl.column))
        elif kind == "layer":
            groups: dict = {}
            for sl in doc.overrides.values():
                groups.setdefault(sl.value.budget, []).append(sl)
            for b, members in sorted(groups.items(), key=lambda g: min(m.value.layers[0] for m in g[1])):
                head = (members[0].span[0], members[0].column)
                for m in members:
                    alias[(m.span[0], m.column)] = head
                    starts.append((m.span[0], m.column))
                pieces.append(("layer", ir.LayerOverride(tuple(sorted(m.value.layers[0] for m in members)), b), [head]))
        elif kind in doc.single:
            sl = doc.single[kind]
            anchors: list = [(sl.span[0], sl.column)]
            starts.append(anchors[0])
            if kind == "per":
                classes = ["keep"] + (["merge"] if sl.value.merge is not None else []) + ["evict"]
                inside = [sl.inner[c] for c in classes if c in sl.inner] + [(sl.span[1], INF)]
                anchors += [sl.inner.get(c) for c in classes] + [(sl.span[1], INF)]
                blocks.append((sl.span[0], sl.span[1], anchors[0], inside))
            pieces.append((kind, sl.value, anchors))
    first = min(starts)[0] if starts else len(split) + 1

    def leading_anchor(n: int):
        for lo, hi, _, inside in blocks:
            if lo < n < hi:  # inside a per block: the next class line, else the closing brace
                return min(a for a in inside if a[0] > n)
        later = [a for a in starts if a[0] > n]
        return alias.get(min(later), min(later)) if later else None

    def trailing_anchor(n: int):
        for lo, hi, opening, inside in blocks:
            if lo <= n <= hi:  # the last anchor on that line: the opening line, a class, or the close
                here = [a for a in inside if a[0] == n] + ([opening] if n == lo else [])
                return max(here) if here else opening
        here = max(a for a in starts if a[0] == n)
        return alias.get(here, here)

    header, footer = [], []
    leading: dict = {}
    trailing: dict = {}
    for n, (code, com) in enumerate(split, start=1):
        if com is None:
            continue
        if code:
            trailing.setdefault(trailing_anchor(n), []).append(com)
        elif n < first:
            header.append(com)
        else:
            a = leading_anchor(n)
            (footer if a is None else leading.setdefault(a, [])).append(com)

    out = list(header)
    if header and not split[first - 2][0] and split[first - 2][1] is None:
        out.append("")  # keep the blank line that separated the header
    for kind, value, anchors in pieces:
        for line, anchor in zip(statement(kind, value), anchors, strict=True):
            indent = "  " if anchor and anchor[1] == INF else line[: len(line) - len(line.lstrip())]
            out += [indent + c for c in leading.get(anchor, [])]
            tail = trailing.get(anchor)
            out.append(line + ("  " + " ".join(tail) if tail else ""))
    out += footer
    return "\n".join(out) + "\n"
