"""The one error type a policy author ever sees.

Every problem with a policy -- a syntax error, a misspelt name, a budget that
makes no sense, a missing calibration artifact -- surfaces as a
:class:`PolicyError` that says where (``file:line:col``), shows the line with a
caret under the offending column, says what was expected, and suggests the
nearest legal name when one is close. Front ends (the parser, the compose API,
the CLI, the SGLang launcher hook) raise or re-raise only this type.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Loc:
    """A 1-based line and column in a policy's source text."""

    line: int
    column: int


def source_lines(text: str) -> list[str]:
    """Lines as the parser counts them: split at '\\n' only (``str.splitlines``
    also splits at form feeds and Unicode separators, which Lark does not)."""
    lines = [l[:-1] if l.endswith("\r") else l for l in text.split("\n")]
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()
    return lines


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The legal name closest to ``word``, if one is close enough to suggest."""
    choices = sorted(set(choices))
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not matches:
        lowered = {c.lower(): c for c in choices}
        matches = [lowered[word.lower()]] if word.lower() in lowered else []
    return matches[0] if matches else None


class InputError(ValueError):
    """Input an evaluation or a calibration cannot run on (a text shorter
    than the span asked for, a probe with no room for its haystack): the
    command line prints it as one line and exits 1."""


class PolicyError(ValueError):
    """A policy that cannot be read, or that reads but makes no sense.

    Attributes mirror what :meth:`__str__` prints, so tools (and tests) can
    inspect them: ``message``, ``file``, ``line``, ``column`` (1-based, or
    ``None`` when the policy came from Python and has no text), ``source_line``,
    ``expected`` (legal tokens or values) and ``hint`` ("did you mean ...").
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        loc: Loc | None = None,
        text: str | None = None,
        expected: Iterable[str] | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = loc.line if loc else None
        self.column = loc.column if loc else None
        self.source_line = None
        if loc and text is not None:
            lines = source_lines(text)
            if 1 <= loc.line <= len(lines):
                self.source_line = lines[loc.line - 1]
        self.expected = tuple(expected) if expected else ()
        self.hint = hint
        super().__init__(str(self))

    @classmethod
    def suggesting(cls, message: str, word: str, choices: Iterable[str], **kw) -> "PolicyError":
        """An error about an unknown ``word``, with the closest of ``choices``."""
        choices = sorted(set(choices))
        near = did_you_mean(word, choices)
        hint = f"did you mean '{near}'?" if near else None
        return cls(message, expected=kw.pop("expected", choices), hint=hint, **kw)

    def located(self, *, file: str | None = None, loc: Loc | None = None, text: str | None = None) -> "PolicyError":
        """The same error with a location filled in where it had none."""
        return PolicyError(
            self.message,
            file=self.file or file,
            loc=Loc(self.line, self.column) if self.line else loc,
            text=text,
            expected=self.expected,
            hint=self.hint,
        )

    def __str__(self) -> str:
        where = self.file or "<policy>"
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        out = [f"{where}: error: {self.message}"]
        if self.source_line is not None:
            out.append(f"  {self.source_line}")
            # keep tabs so the caret lines up under tab-indented text
            pad = "".join(c if c == "\t" else " " for c in self.source_line[: max(self.column - 1, 0)])
            out.append(f"  {pad}^")
        if self.expected:
            shown = list(self.expected)
            more = f" (and {len(shown) - 12} more)" if len(shown) > 12 else ""
            out.append("expected one of: " + ", ".join(shown[:12]) + more)
        if self.hint:
            out.append(self.hint)
        return "\n".join(out)

    def __reduce__(self):  # picklable across SGLang's spawned processes
        return (_rebuild, (self.message, self.file, self.line, self.column, self.source_line, self.expected, self.hint))


def _rebuild(message, file, line, column, source_line, expected, hint):
    err = PolicyError(message, file=file, loc=Loc(line, column) if line else None, expected=expected, hint=hint)
    err.source_line = source_line
    return err
