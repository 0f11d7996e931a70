"""Finding policies: shipped ones by name, user files by path."""

from __future__ import annotations

from pathlib import Path

from kvpolicy.lang.combinators import Policy
from kvpolicy.lang.errors import PolicyError
from kvpolicy.policies import shipped_names, shipped_path

__all__ = ["load", "shipped_names", "shipped_path"]


def load(name_or_path: str | Path) -> Policy:
    """``load("ems")`` reads a shipped policy; ``load("my.kvp")`` reads a file.

    A string naming an existing file, or ending in ``.kvp``, or containing a
    path separator, is a path; anything else is a shipped name.
    """
    from kvpolicy.dsl.parser import parse_file

    text = str(name_or_path)
    path = Path(text).expanduser()
    if isinstance(name_or_path, Path) or path.is_file() or text.endswith(".kvp") or "/" in text:
        return Policy.of(parse_file(path))
    shipped = shipped_path(text)
    if shipped is None:
        raise PolicyError.suggesting(f"no shipped policy named '{text}' and no such file", text, shipped_names())
    return Policy.of(parse_file(shipped))
