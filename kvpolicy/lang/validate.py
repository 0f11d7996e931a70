"""Semantic checks on a :class:`~kvpolicy.lang.ir.Policy`: it parses, but does it make sense?

One validator serves both front ends. The parser passes a :class:`Locator` so
that each error names the line (and column) it is about; a policy built in
Python gets the same checks without a location.

Location keys, from coarse to fine (the locator tries a key, then drops its
last ``.part``): ``policy``, ``budget``, ``budget.floor``, ``keep``,
``keep.sink``, ``score:NAME``, ``score:NAME:FUNC.KWARG``, ``score:NAME:ref:OTHER``,
``per``, ``per.keep``, ``per.merge``, ``per.evict``, ``layers``,
``override:LAYER``, ``trigger``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from kvpolicy.lang import ir
from kvpolicy.lang.errors import Loc, PolicyError


@dataclass
class Where:
    """A place in some policy file (``extends`` makes it not always the same file)."""

    file: str | None
    text: str | None
    loc: Loc


@dataclass
class Locator:
    """Maps location keys to places; the parser fills it, the validator reads it."""

    places: dict[str, Where] = field(default_factory=dict)
    file: str | None = None
    base_dir: Path | None = None

    def find(self, key: str) -> Where | None:
        while key:
            if key in self.places:
                return self.places[key]
            cut = max(key.rfind("."), key.rfind(":"))
            key = key[:cut] if cut > 0 else ""
        return None

    def error(self, message: str, *keys: str, **kw) -> PolicyError:
        """An error located at the first of ``keys`` written in the file being
        read (so a policy that ``extends`` another is told about its own line),
        else at the first of them found anywhere."""
        found = [w for w in map(self.find, keys) if w is not None]
        own = [w for w in found if w.file == self.file]
        w = (own or found or [None])[0]
        if w is None:
            return PolicyError(message, file=self.file, **kw)
        return PolicyError(message, file=w.file, loc=w.loc, text=w.text, **kw)


def validate(policy: ir.Policy, locator: Locator | None = None) -> None:
    """Raise :class:`PolicyError` for the first thing that makes no sense."""
    _Checker(policy, locator or Locator()).run()


class _Checker:
    def __init__(self, policy: ir.Policy, at: Locator) -> None:
        self.p = policy
        self.at = at

    def fail(self, message: str, *keys: str, **kw) -> PolicyError:
        return self.at.error(message, *keys, **kw)

    def run(self) -> None:
        p = self.p
        if not p.name or not p.name.replace("_", "a").replace("-", "a").isalnum():
            raise self.fail(f"policy name {p.name!r} must be letters, digits, '_' or '-'", "policy")
        self.budget(p.budget, "budget")
        self.protect()
        self.scores()
        self.selection()
        self.layers()
        self.trigger()

    # ------------------------------------------------------------------ budget
    def budget(self, b: ir.Budget, key: str) -> None:
        if not math.isfinite(b.amount) or b.amount <= 0:
            raise self.fail(f"the budget must be positive, got {_num(b.amount)}", key)
        if b.unit == "tokens":
            if b.amount != int(b.amount):
                raise self.fail(f"a token budget is a whole number, got {_num(b.amount)}", key)
            for name in ("floor", "cap"):
                if getattr(b, name) is not None:
                    raise self.fail(
                        f"'{name}' only applies to a percentage budget; a token budget is already exact",
                        f"{key}.{name}",
                    )
        elif b.amount > 100:
            raise self.fail(f"a budget of {_num(b.amount)}% is over 100% of the prompt", key)
        for name in ("floor", "cap"):
            v = getattr(b, name)
            if v is not None and v <= 0:
                raise self.fail(f"the budget {name} must be positive, got {v}", f"{key}.{name}")
        if b.floor is not None and b.cap is not None and b.floor > b.cap:
            raise self.fail(f"the budget floor {b.floor} is above its cap {b.cap}", f"{key}.floor")

    def token_budget(self) -> int | None:
        b = self.p.budget
        return int(b.amount) if b.unit == "tokens" else None

    # ------------------------------------------------------------------ protect
    def protect(self) -> None:
        pr = self.p.protect
        for name in ("sink", "recent"):
            if getattr(pr, name) < 0:
                raise self.fail(f"'keep {name}' must be 0 or more", f"keep.{name}")
        tb = self.token_budget()
        if tb is not None and self.p.selection is not None and pr.total >= tb:
            raise self.fail(
                f"the protected tokens (sink {pr.sink} + recent {pr.recent} = {pr.total}) fill the whole "
                f"budget of {tb} tokens, so nothing is left to select",
                "keep", "budget",
            )

    # ------------------------------------------------------------------ scores
    def scores(self) -> None:
        seen: list[str] = []
        for d in self.p.scores:
            if d.name in seen:
                raise self.fail(f"score '{d.name}' is defined twice", f"score:{d.name}")
            self.expr(d.expr, d.name, seen)
            seen.append(d.name)

    def expr(self, e: ir.ScoreExpr, owner: str, defined: list[str]) -> None:
        for node in ir.walk(e):
            self.node(node, owner, defined)

    def node(self, e: ir.ScoreExpr, owner: str, defined: list[str]) -> None:
        """One node of a score expression (its children are checked after it)."""
        key = f"score:{owner}"
        if isinstance(e, ir.ScoreRef):
            if e.name == owner:
                raise self.fail(f"score '{owner}' refers to itself", f"{key}:ref:{e.name}")
            if e.name not in defined:
                later = [d.name for d in self.p.scores]
                why = "is defined later; define it first" if e.name in later else "is not defined"
                raise PolicyError.suggesting(
                    f"score '{e.name}' {why}", e.name, defined, expected=defined or ("a score defined above",)
                ).located(**self._where(f"{key}:ref:{e.name}"))
        elif isinstance(e, ir.WeightedSum):
            if not e.terms:
                raise self.fail("an empty sum is not a score", key)
            for w, _ in e.terms:
                if not math.isfinite(w):
                    raise self.fail(f"weight {w} is not a finite number", key)
        elif isinstance(e, ir.Normalize):
            combines = e.kind in ("mean_align", "max_align")
            want = "at least two terms" if combines else "exactly one term"
            n = len(e.args)
            if (combines and n < 2) or (not combines and n != 1):
                raise self.fail(f"{e.kind}() takes {want}, got {n}", f"{key}:{e.kind}")
        elif isinstance(e, ir.LocalAttention):
            if e.window < 1:
                raise self.fail(f"local(window={e.window}): the window needs at least one query", f"{key}:local.window")
            tb = self.token_budget()
            if tb is not None and e.window >= tb:
                raise self.fail(
                    f"the observation window ({e.window}) is not smaller than the budget ({tb} tokens)",
                    f"{key}:local.window", "budget",
                )
            if e.pool is not None:
                if e.pool.size < 1 or e.pool.size % 2 == 0:
                    raise self.fail(
                        f"pool size {e.pool.size} must be odd and positive, so pooled scores stay aligned with tokens",
                        f"{key}:local.pool",
                    )
            self.heads(e.heads, f"{key}:local")
        elif isinstance(e, ir.GlobalAttention):
            self.heads(e.heads, f"{key}:global")
        elif isinstance(e, ir.Redundancy):
            if not -1.0 <= e.threshold < 1.0:
                raise self.fail(f"redundancy(threshold={e.threshold}): a cosine threshold must be in [-1, 1)",
                                f"{key}:redundancy")
        elif isinstance(e, (ir.KeyNorm, ir.ValueNorm, ir.Recency)):
            pass
        else:  # a Python caller passed something that is not IR
            raise self.fail(f"{e!r} is not a score expression", key)

    def heads(self, h: ir.Heads, key: str) -> None:
        if isinstance(h, ir.RetrievalHeads):
            if h.top < 1:
                raise self.fail(f"retrieval(top={h.top}): at least one head must vote", f"{key}.heads")
            if h.artifact is not None:
                self.artifact(h.artifact, "retrieval_heads", f"{key}.heads")

    def artifact(self, name: str, kind: str, key: str) -> None:
        from kvpolicy.lang.artifacts import ArtifactError, load_artifact

        try:
            load_artifact(name, kind, base_dir=self._base_dir(key))
        except ArtifactError as exc:
            raise self.fail(str(exc), key) from None

    def _base_dir(self, key: str) -> Path | None:
        w = self.at.find(key)
        if w is not None and w.file:
            return Path(w.file).parent
        return self.at.base_dir

    def _where(self, key: str) -> dict:
        w = self.at.find(key)
        if w is None:
            return {"file": self.at.file}
        return {"file": w.file, "loc": w.loc, "text": w.text}

    # ------------------------------------------------------------------ selection
    def selection(self) -> None:
        s = self.p.selection
        if s is None:
            if not self.p.budget.is_full:
                raise self.fail(
                    "the budget keeps less than the whole prompt, but no 'per head { ... }' block says which tokens to keep",
                    "budget",
                )
            return
        names = [d.name for d in self.p.scores]
        if s.keep.score not in names:
            raise PolicyError.suggesting(
                f"'keep top {s.keep.score}': no score named '{s.keep.score}'",
                s.keep.score,
                names,
                expected=names or ("a score defined with 'score NAME = ...'",),
            ).located(**self._where("per.keep"))
        if s.keep.p is not None and not (0 < s.keep.p <= 1):
            raise self.fail(f"top-p mass p={_num(s.keep.p)} must be in (0, 1]", "per.keep")
        if s.unit == "pooled":
            if s.safeguard is None or not (0 <= s.safeguard <= 1):
                raise self.fail(f"pooled(safeguard=...) must be in [0, 1], got {s.safeguard}", "per")
        elif s.safeguard is not None:
            raise self.fail("'safeguard' only applies to 'per head pooled(...)'", "per")
        m = s.merge
        if m is not None:
            if m.target == "kv" and m.metric != "cosine":
                raise self.fail(f"similar(kv, ...) multiplies the cosine similarities of keys and values: "
                                f"write 'cosine > t', not '{m.metric}'", "per.merge")
            if m.metric == "cosine" and not (-1 <= m.threshold <= 1):
                raise self.fail(f"a cosine threshold lies in [-1, 1], got {_num(m.threshold)}", "per.merge")
            if m.metric == "l2" and m.threshold < 0:
                raise self.fail(f"an l2 distance threshold is 0 or more, got {_num(m.threshold)}", "per.merge")
            if not math.isfinite(m.threshold):
                raise self.fail("the merge threshold must be a finite number", "per.merge")
            if m.cover is not None and not (0 < m.cover <= 1):
                raise self.fail(f"cover={_num(m.cover)} is a share of the score mass, in (0, 1]", "per.merge")
        if s.evict.into == "zero_class" and m is None:
            raise self.fail(
                "'evict rest into zero_class' only matters beside a merge class; without one write 'evict rest'",
                "per.evict",
            )

    # ------------------------------------------------------------------ layers
    def layers(self) -> None:
        sch = self.p.layers
        if isinstance(sch, ir.Pyramid) and not (math.isfinite(sch.beta) and sch.beta >= 1):
            raise self.fail(f"pyramid(beta={_num(sch.beta)}): beta must be 1 or more", "layers")
        if isinstance(sch, ir.Explicit):
            if not sch.weights:
                raise self.fail("an explicit layer list needs at least one entry", "layers")
            if any(w <= 0 for w in sch.weights):
                raise self.fail("every entry of an explicit layer list must be positive", "layers")
        if isinstance(sch, ir.Adaptive) and sch.artifact is not None:
            self.artifact(sch.artifact, "layer_budgets", "layers")
        seen: set[int] = set()
        for ov in self.p.overrides:
            key = f"override:{ov.layers[0] if ov.layers else ''}"
            if not ov.layers:
                raise self.fail("a layer override names no layers", key)
            for i in ov.layers:
                if i < 0:
                    raise self.fail(f"layer {i}: layers count from 0", key)
                if i in seen:
                    raise self.fail(f"layer {i} is overridden twice", f"override:{i}")
                seen.add(i)
            self.budget(ov.budget, key)

    def trigger(self) -> None:
        t = self.p.trigger
        if t.decode_every is not None and t.decode_every < 1:
            raise self.fail(f"'every {t.decode_every} tokens' must be at least 1", "trigger")
        if not t.prefill and t.decode_every is None:
            raise self.fail("the trigger never fires: give 'prefill', 'every N tokens', or both", "trigger")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))
