"""Shared fixtures: a small valid policy to mutate, and artifact writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

VALID = """\
policy demo
budget 256 tokens
keep sink 4, recent 32
score g = global(norm=mean)
score l = local(window=32, pool=max(7))
score importance = mean_align(g, l)
per head {
  keep top importance
  merge similar(keys, cosine > 0.9) into centers
  evict rest into zero_class
}
layers uniform
"""


#: the session fixtures that start real SGLang servers (tests/serve/conftest.py)
SERVER_FIXTURES = {"plain_server", "ems_server", "pressure_server"}


def pytest_collection_modifyitems(config, items):
    """Every test that uses a server is marked ``serve``."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.serve)


@pytest.fixture
def valid_text() -> str:
    return VALID


def heads_artifact(num_layers: int = 2, num_heads: int = 4, model: str = "tiny") -> dict:
    scores = [[float((l * 7 + h * 3) % 5) for h in range(num_heads)] for l in range(num_layers)]
    ranked = [sorted(range(num_heads), key=lambda h: -row[h]) for row in scores]
    return {"kind": "retrieval_heads", "version": 1, "model": model, "num_layers": num_layers,
            "num_heads": num_heads, "scores": scores, "ranked": ranked}


def layers_artifact(shares, model: str = "tiny") -> dict:
    return {"kind": "layer_budgets", "version": 1, "model": model, "num_layers": len(shares), "shares": list(shares)}


@pytest.fixture
def write_json(tmp_path: Path):
    def write(name: str, data) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(data) if not isinstance(data, str) else data)
        return path

    return write
