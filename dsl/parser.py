"""Policy text -> :class:`~kvpolicy.lang.ir.Policy`.

Three steps, each raising only :class:`~kvpolicy.lang.errors.PolicyError`:

1. Lark parses the text with ``grammar.lark`` (LALR); its errors are translated
   by :mod:`kvpolicy.dsl.errors`.
2. The tree is read into *slots* (one per statement kind, one per score name,
   one per overridden layer), each remembering where it was written. Function
   calls, option names and enumerated values are checked here, where the exact
   column is known, with "did you mean" suggestions.
3. ``extends`` merges a parent's slots under the child's (a child line replaces
   the parent's line of the same kind; a score replaces the parent's score of
   the same name), then the flattened policy is built and checked by
   :func:`kvpolicy.lang.validate.validate` with a locator pointing into whichever
   file each line came from.

Lark trees never leave this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedInput

from kvpolicy.dsl.errors import translate
from kvpolicy.lang import ir
from kvpolicy.lang.errors import Loc, PolicyError
from kvpolicy.lang.validate import Locator, Where, validate
from kvpolicy.policies import shipped_names, shipped_path

GRAMMAR = Path(__file__).with_name("grammar.lark")


SCORE_TERMS = ("global", "local", "key_norm", "value_norm", "recency", "redundancy")
NORMALIZERS = ("mean_align", "max_align", "zscore", "rank")
SCORE_FUNCTIONS = SCORE_TERMS + NORMALIZERS
SCHEDULES = ("uniform", "pyramid", "adaptive")
UNITS = ("head", "layer")
MAX_NESTING = 64


@lru_cache(maxsize=1)
def lark_parser() -> Lark:
    return Lark(GRAMMAR.read_text(encoding="utf-8"), parser="lalr", propagate_positions=True, maybe_placeholders=True)


# --------------------------------------------------------------------------- slots


@dataclass
class Slot:
    value: Any
    places: dict[str, Where]
    # where the statement sits, for the formatter's comments: first and last line,
    # first column; in a per block, each class statement's (line, column)
    span: tuple[int, int] = (0, 0)
    column: int = 0
    inner: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class Document:
    """A file read into slots, before ``extends`` is resolved."""

    file: str | None
    text: str
    single: dict[str, Slot] = field(default_factory=dict)
    scores: dict[str, Slot] = field(default_factory=dict)
    overrides: dict[int, Slot] = field(default_factory=dict)  # by layer index


# --------------------------------------------------------------------------- public API


def parse(text: str, file: str | None = None, *, base_dir: str | Path | None = None) -> ir.Policy:
    """Parse and check a policy. ``file`` names it in errors and anchors
    relative paths (``extends``, artifacts); otherwise ``base_dir`` or the
    current directory does."""
    base = Path(file).parent if file else (Path(base_dir) if base_dir else Path.cwd())
    doc = _resolve(_read(text, file), base, stack=(file,) if file else ())
    return _build(doc, base)


def parse_file(path: str | Path) -> ir.Policy:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"policy file '{path}' not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read policy file '{path}': {exc}") from None
    return parse(text, str(path))


# --------------------------------------------------------------------------- step 1-2: text -> Document


def parse_budget(text: str) -> ir.Budget:
    """The budget part of a ``budget`` line: ``"5%, floor 128"``."""
    source = f"budget {text}"
    try:
        slot = _read(source, None).single.get("budget")
    except PolicyError as exc:
        raise PolicyError(f"budget {text!r}: {exc.message}", expected=exc.expected, hint=exc.hint) from None
    if slot is None or "\n" in text or ";" in text:
        raise PolicyError(f"budget {text!r}: expected one budget such as '256 tokens' or '2%, floor 64'")
    return slot.value


def read_document(text: str, file: str | None = None) -> Document:
    """The file's own statements, ``extends`` not resolved (what ``kvpolicy fmt`` prints)."""
    return _read(text, file)


def _read(text: str, file: str | None) -> Document:
    try:
        tree = lark_parser().parse(text)
    except UnexpectedInput as exc:
        raise translate(exc, lark_parser(), text, file) from None
    except RecursionError:
        raise PolicyError("the policy is nested too deeply to read", file=file) from None
    reader = _Reader(Document(file, text))
    for stmt in tree.children:
        reader.statement(stmt)
    return reader.doc


class _Reader:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.places: dict[str, Where] = {}
        self.depth = 0

    # -- locations ------------------------------------------------------------
    def where(self, node) -> Where:
        if isinstance(node, Token):
            return Where(self.doc.file, self.doc.text, Loc(node.line, node.column))
        return Where(self.doc.file, self.doc.text, Loc(node.meta.line, node.meta.column))

    def error(self, message: str, node, **kw) -> PolicyError:
        w = self.where(node)
        return PolicyError(message, file=w.file, loc=w.loc, text=w.text, **kw)

    def unknown(self, what: str, word: str, choices, node, extra: str = "") -> PolicyError:
        w = self.where(node)
        return PolicyError.suggesting(
            f"unknown {what} '{word}'{extra}", word, choices, file=w.file, loc=w.loc, text=w.text
        )

    def mark(self, key: str, node) -> None:
        self.places.setdefault(key, self.where(node))

    # -- statements -----------------------------------------------------------
    def statement(self, stmt: Tree) -> None:
        self.places = {}
        self.inner: dict[str, tuple[int, int]] = {}
        span, col = (stmt.meta.line, stmt.meta.end_line), stmt.meta.column
        kind = stmt.data
        handler = getattr(self, kind)
        if kind == "score_stmt":
            name_tok = stmt.children[0]
            name = str(name_tok)
            if name in self.doc.scores:
                first = self.doc.scores[name].places[f"score:{name}"].loc.line
                raise self.error(f"score '{name}' is defined twice (first at line {first})", name_tok)
            self.mark(f"score:{name}", name_tok)
            value = handler(stmt)
            self.doc.scores[name] = Slot(value, self.places, span, col)
            return
        if kind == "layer_stmt":
            for ov in handler(stmt):
                i = ov.layers[0]
                if i in self.doc.overrides:
                    first = self.doc.overrides[i].places[f"override:{i}"].loc.line
                    raise self.error(f"layer {i} is overridden twice (first at line {first})", stmt)
                self.doc.overrides[i] = Slot(ov, {f"override:{i}": self.where(stmt)}, span, col)
            return
        key = kind.removesuffix("_stmt").removesuffix("_block")
        key = {"protect": "keep", "select": "per"}.get(key, key)
        if key in self.doc.single:
            first = self.doc.single[key].places[key].loc.line
            raise self.error(f"duplicate '{key}' statement (first at line {first})", stmt)
        self.mark(key, stmt)
        value = handler(stmt)
        self.doc.single[key] = Slot(value, self.places, span, col, self.inner)

    def policy_stmt(self, stmt: Tree) -> str:
        return str(stmt.children[0])

    def description_stmt(self, stmt: Tree) -> str:
        return self.string(stmt.children[0])

    def extends_stmt(self, stmt: Tree) -> tuple[str, bool]:
        tok = stmt.children[0]
        return (self.string(tok), True) if tok.type == "STRING" else (str(tok), False)

    def budget_stmt(self, stmt: Tree, key: str = "budget") -> ir.Budget:
        amount, *options = stmt.children
        value = self.number(amount.children[0])
        unit = "tokens" if amount.data == "tokens" else "percent"
        if unit == "tokens":
            value = self.integer(amount.children[0], "a token budget")
        opts = self.named_integers(options, ("floor", "cap"), "budget option", key, "the budget {}")
        return ir.Budget(value, unit, opts.get("floor"), opts.get("cap"))

    def protect_stmt(self, stmt: Tree) -> ir.Protect:
        return ir.Protect(**self.named_integers(stmt.children, ("sink", "recent"), "protected set", "keep", "'{}'"))

    def named_integers(self, items: list[Tree], legal: tuple[str, ...], what: str, key: str, label: str) -> dict[str, int]:
        """``NAME NUMBER`` items (``floor 64``, ``recent 32``): legal names, each once, whole numbers."""
        got: dict[str, int] = {}
        for item in items:
            name_tok, num = item.children
            name = str(name_tok)
            if name not in legal:
                raise self.unknown(what, name, legal, name_tok)
            if name in got:
                raise self.error(f"'{name}' is given twice", name_tok)
            self.mark(f"{key}.{name}", name_tok)
            got[name] = self.integer(num, label.format(name))
        return got

    def score_stmt(self, stmt: Tree) -> ir.ScoreDef:
        name_tok, expr = stmt.children
        self.owner = str(name_tok)
        return ir.ScoreDef(self.owner, self.expr(expr))

    def select_block(self, stmt: Tree) -> ir.Selection:
        unit_tok, modifier, *classes = stmt.children
        unit = str(unit_tok)
        if unit not in UNITS:
            raise self.unknown("selection unit", unit, UNITS, unit_tok, " (write 'per head' or 'per layer')")
        safeguard = None
        if modifier is not None:
            fname = self.call_name(modifier)
            if fname != "pooled":
                raise self.unknown("unit modifier", fname, ("pooled",), modifier.children[0])
            if unit != "head":
                raise self.error("'pooled' pools the heads of a layer: write 'per head pooled(...)'", modifier)
            args = self.call_args(modifier, allowed=("safeguard",), positional=0)
            safeguard = self.number(args["safeguard"]) if "safeguard" in args else 0.2
            unit = "pooled"
        keep = merge = evict = None
        for c in classes:
            if c.data == "keep_class":
                if keep is not None:
                    raise self.error("a selection has one keep class", c)
                if merge is not None or evict is not None:
                    raise self.error("'keep' comes first: keep, then merge, then evict", c)
                keep = self.keep_class(c)
                self.mark("per.keep", c)
                self.inner["keep"] = (c.meta.line, c.meta.column)
            elif c.data == "merge_class":
                if merge is not None:
                    raise self.error("a selection has one merge class", c)
                if keep is None:
                    raise self.error(
                        "merge without a keep class: tokens merge into the kept ones, so write 'keep top SCORE' first", c
                    )
                if evict is not None:
                    raise self.error("'merge' comes before 'evict'", c)
                merge = self.merge_class(c)
                self.mark("per.merge", c)
                self.inner["merge"] = (c.meta.line, c.meta.column)
            else:
                if evict is not None:
                    raise self.error("a selection has one evict class", c)
                into = c.children[0]
                if into is not None and str(into) != "zero_class":
                    raise self.unknown("evict target", str(into), ("zero_class",), into)
                evict = ir.Evict("zero_class" if into is not None else "drop")
                self.mark("per.evict", c)
                self.inner["evict"] = (c.meta.line, c.meta.column)
        if keep is None:
            raise self.error("the selection has no keep class: add 'keep top SCORE'", stmt)
        return ir.Selection(unit, keep, merge, evict or ir.Evict(), safeguard)

    def keep_class(self, c: Tree) -> ir.KeepTop:
        name_tok, *options = c.children
        opts = self.options(options, {"p": "number"})
        return ir.KeepTop(str(name_tok), opts.get("p"))

    def merge_class(self, c: Tree) -> ir.MergeSimilar:
        call, into, *options = c.children
        fname = self.call_name(call)
        if fname != "similar":
            raise self.unknown("merge rule", fname, ("similar",), call.children[0])
        if str(into) != "centers":
            raise self.unknown("merge target", str(into), ("centers",), into)
        args = [a for a in call.children[1:] if a is not None]
        if len(args) != 2 or args[0].data != "posarg" or args[1].data != "comparison":
            raise self.error("write similar(keys, cosine > 0.9): what to compare, then metric, '>' or '<', threshold", call)
        target = self.choice(self.plain_atom(args[0].children[0]), ir.MERGE_TARGETS, "merge vector")
        metric_tok, op_tok, sign, num = args[1].children
        metric = str(metric_tok)
        if metric not in ir.MERGE_METRICS:
            raise self.unknown("similarity metric", metric, ir.MERGE_METRICS, metric_tok)
        want = "<" if metric == "l2" else ">"
        if str(op_tok) != want:
            raise self.error(
                f"'{metric}' merges when {'distance' if metric == 'l2' else 'similarity'} is "
                f"{'below' if want == '<' else 'above'} the threshold: write '{metric} {want} {sign or ''}{num}'",
                op_tok,
            )
        opts = self.options(options, {"weight": ir.MERGE_WEIGHTS, "cover": "number"})
        threshold = self.number(num) * (-1.0 if sign is not None and str(sign) == "-" else 1.0)
        return ir.MergeSimilar(target, metric, threshold, opts.get("weight", "score"), opts.get("cover"))

    def options(self, options: list[Tree], spec: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for opt in options:
            name_tok, val = opt.children
            name = str(name_tok)
            if name not in spec:
                raise self.unknown("option", name, spec, name_tok)
            if name in out:
                raise self.error(f"'{name}' is given twice", name_tok)
            kind = spec[name]
            if kind == "number":
                if val.type != "NUMBER":
                    raise self.error(f"'{name}' takes a number", val)
                out[name] = self.number(val)
            else:
                if val.type != "NAME" or str(val) not in kind:
                    raise self.unknown(f"value for '{name}'", str(val), kind, val)
                out[name] = str(val)
        return out

    def layers_stmt(self, stmt: Tree) -> ir.LayerSchedule:
        sched = stmt.children[0]
        if sched.data == "schedule_list":
            return ir.Explicit(tuple(self.integer(n, "a layer budget") for n in sched.children))
        if sched.data == "schedule_name":
            tok = sched.children[0]
            if str(tok) == "uniform":
                return ir.Uniform()
            if str(tok) in SCHEDULES:
                raise self.error(f"'{tok}' takes arguments: write {tok}(...)", tok)
            raise self.unknown("layer schedule", str(tok), SCHEDULES, tok)
        call = sched.children[0]
        fname = self.call_name(call)
        if fname == "pyramid":
            args = self.call_args(call, allowed=("beta",), positional=0)
            return ir.Pyramid(self.number(args["beta"]) if "beta" in args else 20.0)
        if fname == "adaptive":
            args = self.call_args(call, allowed=(), positional=1)
            return ir.Adaptive(self.string(args[0]) if 0 in args else None)
        if fname == "uniform":
            self.call_args(call, allowed=(), positional=0)
            return ir.Uniform()
        raise self.unknown("layer schedule", fname, SCHEDULES, call.children[0])

    def layer_stmt(self, stmt: Tree) -> list[ir.LayerOverride]:
        ranges, rest = [], []
        for c in stmt.children:
            (ranges if isinstance(c, Tree) and c.data == "layer_range" else rest).append(c)
        budget = self.budget_stmt(Tree("budget_stmt", rest, stmt.meta), key="override")
        layers: list[int] = []
        for r in ranges:
            lo_tok, _dash, hi_tok = r.children
            lo = self.integer(lo_tok, "a layer index")
            hi = self.integer(hi_tok, "a layer index") if hi_tok is not None else lo
            if hi < lo:
                raise self.error(f"layer range {lo}-{hi} runs backwards", r)
            if hi - lo > 100_000:
                raise self.error(f"layer range {lo}-{hi} is too large", r)
            layers.extend(range(lo, hi + 1))
        if len(set(layers)) != len(layers):
            raise self.error("a layer is named twice on this line", stmt)
        # one override per layer: a child file can then replace single layers
        return [ir.LayerOverride((i,), budget) for i in layers]

    def trigger_stmt(self, stmt: Tree) -> ir.Trigger:
        prefill, every = False, None
        for item in stmt.children:
            if item.data == "trigger_prefill":
                if prefill:
                    raise self.error("'prefill' is given twice", item)
                prefill = True
            else:
                if every is not None:
                    raise self.error("'every' is given twice", item)
                every = self.integer(item.children[0], "'every'")
        return ir.Trigger(prefill, every)

    # -- score expressions ----------------------------------------------------
    def expr(self, tree: Tree) -> ir.ScoreExpr:
        self.depth += 1
        try:
            if self.depth > MAX_NESTING:
                raise self.error("the expression is nested too deeply", tree)
            kids = list(tree.children)
            terms: list[tuple[float, ir.ScoreExpr]] = []
            sign, explicit = 1.0, False
            leading_sign = isinstance(kids[0], Token) and kids[0].type == "SIGN" and str(kids[0]) == "-"
            for k in kids:
                if isinstance(k, Token):  # SIGN
                    sign = -1.0 if str(k) == "-" else 1.0
                    continue
                if k.data == "weighted":
                    num, atom = k.children
                    w = self.number(num)
                    explicit = True
                else:
                    atom, w = k.children[0], 1.0
                terms.append((sign * w, self.atom(atom)))
                sign = 1.0
            if len(terms) == 1 and not explicit and not leading_sign:
                return terms[0][1]
            return ir.WeightedSum(tuple(terms))
        finally:
            self.depth -= 1

    def atom(self, node) -> ir.ScoreExpr:
        if node.data == "paren":
            return self.expr(node.children[0])
        if node.data == "ref":
            tok = node.children[0]
            name = str(tok)
            if name in SCORE_FUNCTIONS and name not in self.doc.scores:
                raise self.error(f"'{name}' is a function: write {name}()", tok)
            self.mark(f"score:{self.owner}:ref:{name}", tok)
            return ir.ScoreRef(name)
        if node.data == "number":
            raise self.error("a number alone is not a score; weight a score with 'NUMBER * score'", node)
        if node.data == "string":
            raise self.error("a string is not a score", node)
        return self.score_call(node)

    def score_call(self, call: Tree) -> ir.ScoreExpr:
        fname = self.call_name(call)
        name_tok = call.children[0]
        if fname not in SCORE_FUNCTIONS:
            raise self.unknown("score function", fname, SCORE_FUNCTIONS, name_tok)
        key = f"score:{self.owner}:{fname}"
        self.mark(key, name_tok)
        if fname in NORMALIZERS:
            args = [a for a in call.children[1:] if a is not None]
            for a in args:
                if a.data != "posarg":
                    raise self.error(f"{fname}() takes score expressions, not options", a)
            return ir.Normalize(fname, tuple(self.expr(a.children[0]) for a in args))
        if fname == "redundancy":
            args = self.call_args(call, allowed=("threshold",), positional=0, key=key)
            return ir.Redundancy(self.number(args["threshold"])) if "threshold" in args else ir.Redundancy()
        if fname in ("key_norm", "value_norm", "recency"):
            self.call_args(call, allowed=(), positional=0)
            return {"key_norm": ir.KeyNorm, "value_norm": ir.ValueNorm, "recency": ir.Recency}[fname]()
        allowed = ("norm", "heads", "gqa") if fname == "global" else ("window", "pool", "heads", "gqa")
        args = self.call_args(call, allowed=allowed, positional=0, key=key)
        heads = self.heads(args["heads"]) if "heads" in args else ir.AllHeads()
        gqa = self.choice(args["gqa"], ir.GQA_REDUCES, "GQA reduction") if "gqa" in args else "mean"
        if fname == "global":
            norm = self.choice(args["norm"], ir.GLOBAL_NORMS, "normalisation") if "norm" in args else "sum"
            return ir.GlobalAttention(norm, heads, gqa)
        if "window" not in args:
            raise self.error("local() needs window=N: how many of the last prompt queries score", call)
        window = self.integer(args["window"], "window")
        pool = self.pool(args["pool"]) if "pool" in args else None
        return ir.LocalAttention(window, pool, heads, gqa)

    def heads(self, node) -> ir.Heads:
        if self.is_name(node, "all"):
            return ir.AllHeads()
        if isinstance(node, Tree) and node.data == "call" and self.call_name(node) == "retrieval":
            args = self.call_args(node, allowed=("top",), positional=1)
            top = self.integer(args["top"], "top") if "top" in args else 4
            return ir.RetrievalHeads(top, self.string(args[0]) if 0 in args else None)
        word = self.word(node)
        raise self.unknown("head set", word, ("all", "retrieval"), node, " (write heads=all or heads=retrieval(...))")

    def pool(self, node) -> ir.Pool | None:
        if self.is_name(node, "none"):
            return None
        if isinstance(node, Tree) and node.data == "call" and self.call_name(node) in ir.POOL_KINDS:
            args = self.call_args(node, allowed=(), positional=1)
            if 0 not in args:
                raise self.error(f"{self.call_name(node)}() needs a kernel size, e.g. {self.call_name(node)}(5)", node)
            return ir.Pool(self.call_name(node), self.integer(args[0], "pool size"))
        raise self.unknown("pooling", self.word(node), ("avg", "max", "none"), node, " (write pool=avg(5), max(7) or none)")

    # -- call helpers ---------------------------------------------------------
    def call_name(self, call: Tree) -> str:
        return str(call.children[0])

    def call_args(self, call: Tree, *, allowed, positional: int, key: str | None = None) -> dict:
        """Keyword args as ``{name: value node}``, positional ones as ``{0: node}``."""
        fname = self.call_name(call)
        out: dict = {}
        pos = 0
        for a in call.children[1:]:
            if a is None:
                continue
            if a.data == "posarg":
                if pos >= positional:
                    what = "no positional arguments" if positional == 0 else f"{positional} positional argument"
                    raise self.error(f"{fname}() takes {what}", a)
                out[pos] = self.plain_atom(a.children[0])
                pos += 1
            elif a.data == "kwarg":
                name_tok, val = a.children
                name = str(name_tok)
                if name not in allowed:
                    if not allowed:
                        raise self.error(f"{fname}() takes no options", name_tok)
                    raise self.unknown(f"option of {fname}()", name, allowed, name_tok)
                if name in out:
                    raise self.error(f"'{name}' is given twice", name_tok)
                if key:
                    self.mark(f"{key}.{name}", name_tok)
                out[name] = self.plain_atom(val)
            else:
                raise self.error(f"{fname}() takes no comparison", a)
        return out

    def plain_atom(self, expr: Tree):
        """The single atom of an option value (``avg(5)``, ``32``, ``"x"``, ``mean``)."""
        kids = expr.children
        if len(kids) != 1 or kids[0].data != "unweighted":
            raise self.error("expected a single value here, not an arithmetic expression", expr)
        atom = kids[0].children[0]
        return atom.children[0] if atom.data in ("ref", "number", "string") else atom

    def is_name(self, node, name: str) -> bool:
        return isinstance(node, Token) and node.type == "NAME" and str(node) == name

    def word(self, node) -> str:
        if isinstance(node, Token):
            return str(node)
        if node.data == "call":
            return self.call_name(node)
        return node.data

    def choice(self, node, choices, what: str) -> str:
        if not (isinstance(node, Token) and node.type == "NAME"):
            raise self.error(f"expected a {what}: one of {', '.join(choices)}", node, expected=choices)
        if str(node) not in choices:
            raise self.unknown(what, str(node), choices, node)
        return str(node)

    # -- literals -------------------------------------------------------------
    def number(self, tok) -> float:
        if not (isinstance(tok, Token) and tok.type == "NUMBER"):
            raise self.error("expected a number", tok)
        value = float(str(tok))
        if not math.isfinite(value):
            raise self.error(f"{tok} is too large", tok)
        return value

    def integer(self, tok, what: str) -> int:
        value = self.number(tok)
        if not value.is_integer():
            raise self.error(f"{what} must be a whole number, got {tok}", tok)
        return int(value)

    def string(self, tok) -> str:
        if not (isinstance(tok, Token) and tok.type == "STRING"):
            raise self.error('expected a "string"', tok)
        try:
            return json.loads(str(tok), strict=False)
        except json.JSONDecodeError:
            raise self.error("bad escape in string (use \\\", \\\\, \\n or \\u00e9)", tok) from None


# --------------------------------------------------------------------------- step 3: extends, build


def _resolve(doc: Document, base: Path, stack: tuple) -> Document:
    ext = doc.single.get("extends")
    if ext is None:
        return doc
    target, is_path = ext.value
    where = ext.places["extends"]
    if is_path:
        path = Path(target).expanduser()
        path = path if path.is_absolute() else base / path
    else:
        path = shipped_path(target)
        if path is None:
            raise PolicyError.suggesting(
                f"no shipped policy named '{target}'", target, shipped_names(),
                file=where.file, loc=where.loc, text=where.text,
            )
    key = str(path.resolve())
    if key in stack:
        raise PolicyError(f"'{target}' extends itself (cycle: {' -> '.join(map(str, stack + (key,)))})",
                          file=where.file, loc=where.loc, text=where.text)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise PolicyError(f"cannot read the policy it extends: '{path}'",
                          file=where.file, loc=where.loc, text=where.text) from None
    parent = _resolve(_read(text, str(path)), path.parent, stack + (key,))
    merged = Document(doc.file, doc.text)
    merged.single = {**parent.single, **{k: v for k, v in doc.single.items() if k != "extends"}}
    merged.scores = dict(parent.scores)
    merged.scores.update(doc.scores)  # same name: child's definition, parent's order
    merged.overrides = {**parent.overrides, **doc.overrides}
    return merged


def _build(doc: Document, base: Path) -> ir.Policy:
    locator = Locator(file=doc.file, base_dir=base)
    for slot in (*doc.single.values(), *doc.scores.values(), *doc.overrides.values()):
        locator.places.update(slot.places)

    def value(key: str, default=None):
        slot = doc.single.get(key)
        return slot.value if slot else default

    if "policy" not in doc.single:
        raise PolicyError("the policy has no name: add a line 'policy NAME'", file=doc.file,
                          loc=Loc(1, 1), text=doc.text)
    if "budget" not in doc.single:
        raise locator.error("the policy has no budget: add 'budget 256 tokens' or 'budget 2%'", "policy")
    overrides = ir.group_overrides(ov.value for ov in doc.overrides.values())
    policy = ir.Policy(
        name=value("policy"),
        budget=value("budget"),
        description=value("description", ""),
        protect=value("keep", ir.Protect()),
        scores=tuple(slot.value for slot in doc.scores.values()),
        selection=value("per"),
        layers=value("layers", ir.Uniform()),
        overrides=overrides,
        trigger=value("trigger", ir.Trigger()),
        source=doc.file,
    )
    validate(policy, locator)
    return policy
