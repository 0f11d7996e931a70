"""Policies as users hold them: the IR's data (:class:`kvpolicy.lang.ir.Policy`)
with the combinators that change one part and re-check the whole, and
printing as canonical ``.kvp`` text.

This is the language layer's face of a policy (ARCHITECTURE.md): it coerces
budget strings (with the language's own budget grammar), validates after every
change and prints through the formatter, so that :mod:`kvpolicy.lang.ir` itself
stays data only. :func:`kvpolicy.load` and every :mod:`kvpolicy.lang.compose`
constructor return this class; ``==`` and ``hash`` compare the fields only,
so a parsed IR policy equals the same policy built here.
"""

from __future__ import annotations

from dataclasses import fields, replace

from kvpolicy.lang import ir
from kvpolicy.lang.errors import PolicyError
from kvpolicy.lang.validate import validate


def as_budget(b: "ir.Budget | int | str") -> ir.Budget:
    """``256`` or ``"256 tokens"`` -> tokens; ``"2%"`` -> 2 percent of the prompt;
    any budget the language accepts, e.g. ``"5%, floor 128, cap 2048"``."""
    if isinstance(b, ir.Budget):
        return b
    if isinstance(b, bool) or isinstance(b, float):
        raise PolicyError(f"budget {b!r}: give tokens as an int (256) or a share as a string ('2%')")
    if isinstance(b, int):
        return ir.Budget(b, "tokens")
    if isinstance(b, str):
        if b.strip().isdigit():
            return ir.Budget(int(b), "tokens")
        from kvpolicy.dsl.parser import parse_budget

        return parse_budget(b)
    raise PolicyError(f"budget {b!r}: expected an int number of tokens or a string such as '256 tokens', "
                      "'2%' or '5%, floor 128'")


class Policy(ir.Policy):
    """A checked policy with combinators; each returns a new, checked policy."""

    @classmethod
    def of(cls, policy: ir.Policy) -> "Policy":
        """The same policy (already checked) as this class."""
        if isinstance(policy, cls):
            return policy
        return cls(**{f.name: getattr(policy, f.name) for f in fields(ir.Policy)})

    def with_budget(self, budget: "ir.Budget | int | str") -> "Policy":
        return self._checked(budget=as_budget(budget))

    def with_layers(self, schedule: ir.LayerSchedule) -> "Policy":
        return self._checked(layers=schedule)

    def with_keep(self, sink: int | None = None, recent: int | None = None) -> "Policy":
        p = self.protect
        return self._checked(protect=ir.Protect(p.sink if sink is None else sink, p.recent if recent is None else recent))

    def with_score(self, name: str, expr: "ir.ScoreExpr | str") -> "Policy":
        """Define or replace ``score name = expr``."""
        d = ir.ScoreDef(name, ir._as_expr(expr))
        names = [s.name for s in self.scores]
        scores = tuple(d if s.name == name else s for s in self.scores) if name in names else self.scores + (d,)
        return self._checked(scores=scores)

    def with_selection(self, selection: ir.Selection) -> "Policy":
        return self._checked(selection=selection)

    def with_trigger(self, prefill: bool = True, decode_every: int | None = None) -> "Policy":
        return self._checked(trigger=ir.Trigger(prefill, decode_every))

    def with_override(self, layers, budget: "ir.Budget | int | str") -> "Policy":
        """Give ``layers`` (an int, iterable or range) their own budget;
        ``with_override(range(2), "100%")`` keeps everything in the first two."""
        idx = {layers} if isinstance(layers, int) else set(layers)
        kept = [ir.LayerOverride(tuple(i for i in o.layers if i not in idx), o.budget) for o in self.overrides]
        singles = [ir.LayerOverride((i,), o.budget) for o in kept for i in o.layers]
        singles += [ir.LayerOverride((i,), as_budget(budget)) for i in idx]
        return self._checked(overrides=ir.group_overrides(singles))

    def with_name(self, name: str, description: str | None = None) -> "Policy":
        return self._checked(name=name, description=self.description if description is None else description)

    def _checked(self, **changes) -> "Policy":
        p = replace(self, **changes)
        validate(p)
        return p

    def to_kvp(self) -> str:
        """The canonical ``.kvp`` text of this policy."""
        from kvpolicy.dsl.formatter import format_policy

        return format_policy(self)
