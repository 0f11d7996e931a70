"""Turn Lark's parse errors into :class:`~kvpolicy.lang.errors.PolicyError`.

A user never sees a Lark exception: each one becomes the domain error with the
location, the source line and caret, the expected tokens spelt the way the
user writes them, and a "did you mean" when the offending word is close to a
keyword that would have been legal there.
"""

from __future__ import annotations

import re

from lark import Lark
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from kvpolicy.lang.errors import Loc, PolicyError, did_you_mean, source_lines

# How the grammar's named terminals read in an error message.
_READABLE = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": 'a "string"',
    "SIGN": "'+' or '-'",
    "RANGE": "'-'",
    "COMPARE": "a comparison ('>' or '<')",
    "_NL": "end of line",
    "$END": "end of file",
}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _literal(parser: Lark, terminal: str) -> str | None:
    """The literal text of an anonymous terminal ('budget', ',' ...), if it has one."""
    try:
        pattern = parser.get_terminal(terminal).pattern
    except KeyError:
        return None
    return pattern.value if pattern.type == "str" else None


def _expected(parser: Lark, names) -> tuple[list[str], list[str]]:
    """(readable expected items, the keywords among them)."""
    shown, keywords = [], []
    for name in sorted(set(names)):
        lit = _literal(parser, name)
        if lit is not None:
            shown.append(f"'{lit}'")
            if _WORD.fullmatch(lit):
                keywords.append(lit)
        else:
            shown.append(_READABLE.get(name, name.lower()))
    return sorted(set(shown)), keywords


def translate(exc: UnexpectedInput, parser: Lark, text: str, file: str | None) -> PolicyError:
    """The PolicyError a user sees for a Lark error ``exc`` in ``text``."""
    line = getattr(exc, "line", None) or 1
    column = getattr(exc, "column", None) or 1
    if isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END"):
        lines = source_lines(text) or [""]
        line, column = len(lines), len(lines[-1]) + 1
    if line < 1 or column < 1:
        line, column = 1, 1
    names = getattr(exc, "expected", None) or getattr(exc, "allowed", None) or ()
    shown, keywords = _expected(parser, names)

    all_lines = source_lines(text)
    src = all_lines[line - 1] if 0 < line <= len(all_lines) else ""
    word_match = _WORD.match(src, column - 1)
    word = word_match.group(0) if word_match else None

    if isinstance(exc, UnexpectedCharacters):
        ch = src[column - 1] if column - 1 < len(src) else exc.char
        what = f"unexpected word '{word}'" if word else f"unexpected character {ch!r}"
    elif isinstance(exc, UnexpectedToken) and exc.token.type not in ("$END",):
        tok = str(exc.token)
        if exc.token.type == "_NL":
            what = "unexpected end of line"
        elif exc.token.type == "NAME":
            what = f"unexpected word '{tok}'"
        else:
            what = f"unexpected '{tok}'"
    else:
        what = "unexpected end of file"

    hint = None
    if {"'%'", "'tokens'"} <= set(shown):
        hint = "a budget is a number of tokens ('256 tokens') or a share of the prompt ('2%')"
    if word and keywords:
        near = did_you_mean(word, keywords)
        if near and near != word:
            hint = f"did you mean '{near}'?"
    return PolicyError(what, file=file, loc=Loc(line, column), text=text, expected=shown, hint=hint)
