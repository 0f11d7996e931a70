"""Finding policies: shipped ones by name, user files by path."""

from __future__ import annotations

from pathlib import Path

from kvpolicy import ir
from kvpolicy.artifacts import shipped_dir
from kvpolicy.errors import PolicyError


def shipped_names() -> list[str]:
    """Names of the policies shipped in ``kvpolicy.policies`` (``ems``, ``snapkv`` ...)."""
    return sorted(p.stem for p in shipped_dir().glob("*.kvp"))


def shipped_path(name: str) -> Path | None:
    path = shipped_dir() / f"{name}.kvp"
    return path if path.is_file() else None


def load(name_or_path: str | Path) -> ir.Policy:
    """``load("ems")`` reads a shipped policy; ``load("my.kvp")`` reads a file.

    A string naming an existing file, or ending in ``.kvp``, or containing a
    path separator, is a path; anything else is a shipped name.
    """
    from kvpolicy.dsl.parser import parse_file

    text = str(name_or_path)
    path = Path(text).expanduser()
    if isinstance(name_or_path, Path) or path.is_file() or text.endswith(".kvp") or "/" in text:
        return parse_file(path)
    shipped = shipped_path(text)
    if shipped is None:
        raise PolicyError.suggesting(f"no shipped policy named '{text}' and no such file", text, shipped_names())
    return parse_file(shipped)
