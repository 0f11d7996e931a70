"""Shipped policies (``*.kvp``) and calibration artifacts (``*.json``).

Load one by name with ``kvpolicy.load("ems")``; list them with
:func:`shipped_names`. This package is data: the parser (``extends ems``),
the registry and the artifact lookup all find shipped files through it.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def shipped_names() -> list[str]:
    """Names of the shipped policies (``ems``, ``snapkv`` ...)."""
    return sorted(p.stem for p in FOLDER.glob("*.kvp"))


def shipped_path(name: str) -> Path | None:
    """The shipped policy file of that name, or ``None``."""
    path = FOLDER / f"{name}.kvp"
    return path if path.is_file() else None
