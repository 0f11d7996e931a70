"""Calibration artifacts: the JSON files that policies reference.

Two kinds, both written by ``kvpolicy calibrate`` (CompressKV, arXiv
2508.02401):

``retrieval_heads`` (``*.heads.json``)::

    {"kind": "retrieval_heads", "version": 1, "model": "...",
     "num_layers": L, "num_heads": H,            # query heads
     "scores": [[float] * H] * L,                # semantic retrieval score per head
     "ranked": [[int] * H] * L}                  # per layer, heads by score, best first

``layer_budgets`` (``*.layers.json``)::

    {"kind": "layer_budgets", "version": 1, "model": "...",
     "num_layers": L, "shares": [float] * L}     # eviction-error shares, sum 1

A policy names an artifact by path; a relative path is looked up next to the
policy file, then in the directories of ``KVPOLICY_ARTIFACTS`` (``:``-separated),
then among the shipped policies. ``retrieval()`` / ``adaptive()`` without a path
mean the served model's own artifact, named by :func:`model_artifact_name`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

KINDS = {"retrieval_heads": "heads", "layer_budgets": "layers"}
VERSION = 1


class ArtifactError(ValueError):
    """An artifact that is missing, unreadable or malformed."""


def shipped_dir() -> Path:
    """Where the shipped policies and artifacts live (``kvpolicy.policies``)."""
    from kvpolicy.policies import FOLDER

    return FOLDER


def model_artifact_name(model: str, kind: str) -> str:
    """``"SmolLM2-135M-Instruct"``, ``"retrieval_heads"`` -> ``"smollm2-135m-instruct.heads.json"``."""
    slug = re.sub(r"[^a-z0-9.]+", "-", Path(model.rstrip("/")).name.lower()).strip("-")
    return f"{slug}.{KINDS[kind]}.json"


def search_path(base_dir: Path | None) -> list[Path]:
    dirs = [base_dir] if base_dir else []
    dirs += [Path(d) for d in os.environ.get("KVPOLICY_ARTIFACTS", "").split(os.pathsep) if d]
    dirs.append(shipped_dir())
    unique: list[Path] = []
    for d in dirs:
        if all(d.resolve() != u.resolve() for u in unique):
            unique.append(d)
    return unique


def resolve_artifact(name: str, base_dir: Path | None = None) -> Path:
    path = Path(name).expanduser()
    if path.is_absolute():
        if path.is_file():
            return path
        raise ArtifactError(f"artifact '{name}' not found")
    tried = search_path(base_dir)
    for d in tried:
        if (d / path).is_file():
            return d / path
    where = ", ".join(str(d) for d in tried)
    raise ArtifactError(f"artifact '{name}' not found (looked in: {where}); an artifact is written by a calibration run on the model")


def load_artifact(name: str, kind: str, base_dir: Path | None = None) -> dict[str, Any]:
    """Find, read and check an artifact of ``kind``; the parsed JSON on success."""
    path = resolve_artifact(name, base_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"artifact '{name}' is not readable JSON: {exc}") from None
    check_artifact(data, kind, name)
    return data


def check_artifact(data: Any, kind: str, name: str = "artifact") -> None:
    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"artifact '{name}' is malformed: {why}")

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    if data.get("kind") != kind:
        raise bad(f"its kind is {data.get('kind')!r}, expected {kind!r}")
    if data.get("version") != VERSION:
        raise bad(f"version {data.get('version')!r} is not {VERSION}")
    if not isinstance(data.get("model"), str):
        raise bad("'model' must name the model it was calibrated on")
    L = data.get("num_layers")
    if not isinstance(L, int) or isinstance(L, bool) or L < 1:
        raise bad("'num_layers' must be a positive integer")
    if kind == "retrieval_heads":
        H = data.get("num_heads")
        if not isinstance(H, int) or isinstance(H, bool) or H < 1:
            raise bad("'num_heads' must be a positive integer")
        scores, ranked = data.get("scores"), data.get("ranked")
        if not _matrix(scores, L, H, _is_number):
            raise bad(f"'scores' must be {L} lists of {H} finite numbers")
        if not _matrix(ranked, L, H, lambda v: isinstance(v, int) and not isinstance(v, bool)):
            raise bad(f"'ranked' must be {L} lists of {H} head indices")
        for layer, row in enumerate(ranked):
            if sorted(row) != list(range(H)):
                raise bad(f"'ranked'[{layer}] is not a permutation of the {H} heads")
    elif kind == "layer_budgets":
        shares = data.get("shares")
        if not (isinstance(shares, list) and len(shares) == L and all(_is_number(s) and s >= 0 for s in shares)):
            raise bad(f"'shares' must be {L} non-negative numbers")
        if abs(sum(shares) - 1.0) > 1e-6:
            raise bad(f"'shares' must sum to 1, they sum to {sum(shares):.6g}")
    else:
        raise ArtifactError(f"unknown artifact kind {kind!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _matrix(m: Any, rows: int, cols: int, ok) -> bool:
    return (
        isinstance(m, list)
        and len(m) == rows
        and all(isinstance(r, list) and len(r) == cols and all(ok(v) for v in r) for r in m)
    )
