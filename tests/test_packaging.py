"""One distribution, import names under `kvpolicy` only (ARCHITECTURE.md § Layout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_elsewhere(code: str, tmp_path) -> str:
    """Run ``code`` from a directory outside the repository, so the checkout
    itself is not on sys.path."""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_subpackages_import_under_kvpolicy(tmp_path):
    code = ("import kvpolicy.dsl, kvpolicy.kernels, kvpolicy.sglang_ext, kvpolicy.policies, pathlib;"
            "print(pathlib.Path(kvpolicy.dsl.__file__).parent.name)")
    assert run_elsewhere(code, tmp_path) == "dsl"


def test_no_top_level_dsl_or_kernels_of_ours(tmp_path):
    code = ("import importlib.util as u, json;"
            "specs = {n: u.find_spec(n) for n in ('dsl', 'kernels', 'sglang_ext', 'policies')};"
            "print(json.dumps({n: (s.origin if s else None) for n, s in specs.items()}))")
    import json

    found = json.loads(run_elsewhere(code, tmp_path))
    # 'kernels' may exist as Hugging Face's package; it must never be ours
    for name, origin in found.items():
        assert origin is None or "kvpolicy" not in origin and "/kernels/__init__.py" not in origin.replace(
            "site-packages/kernels", ""), (name, origin)
    assert found["dsl"] is None and found["sglang_ext"] is None and found["policies"] is None


def test_grammar_policies_and_kernel_source_are_package_data(tmp_path):
    code = ("import kvpolicy, pathlib, kvpolicy.dsl.parser as p, kvpolicy.kernels.cpu as c;"
            "print(p.GRAMMAR.is_file(), len(kvpolicy.shipped_names()), c.SOURCE.is_file())")
    shipped = len(list((Path(__file__).parents[1] / "policies").glob("*.kvp")))
    assert run_elsewhere(code, tmp_path) == f"True {shipped} True" and shipped >= 10
