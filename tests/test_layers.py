"""The import contract (ARCHITECTURE.md § Import rules), written once here
and checked on the source: no module imports a layer above its own, not even
inside a function; the executor and the serving runtime never load Lark; the
kernels never import SGLang or the language; the scheduler never imports the
HTTP client."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import package -> folder (pyproject.toml's package-dir)
PACKAGES = {"kvpolicy": "kvpolicy", "kvpolicy.dsl": "dsl", "kvpolicy.kernels": "kernels",
            "kvpolicy.sglang_ext": "sglang_ext", "kvpolicy.policies": "policies"}

#: bottom to top; a module may import its own layer and those below it.
#: A name is a module or a package prefix; the longest match wins.
LAYERS = [
    ("ir", ["kvpolicy.lang", "kvpolicy.lang.errors", "kvpolicy.lang.ir", "kvpolicy.lang.wire", "kvpolicy.policies"]),
    ("checks", ["kvpolicy.lang.artifacts", "kvpolicy.lang.validate", "kvpolicy.lang.budgets"]),
    ("text", ["kvpolicy.dsl"]),
    ("language", ["kvpolicy.lang.combinators", "kvpolicy.lang.registry", "kvpolicy.lang.compose"]),
    ("compile", ["kvpolicy.compile"]),
    ("execute", ["kvpolicy.exec", "kvpolicy.kernels"]),
    ("model", ["kvpolicy.hf"]),
    ("evaluate", ["kvpolicy.eval"]),
    ("serve", ["kvpolicy.sglang_ext"]),
    ("app", ["kvpolicy.cli", "kvpolicy.__main__", "kvpolicy"]),
]

#: what must never be loaded by importing these modules (checked in a fresh interpreter)
NEVER_LOADED = {
    "kvpolicy.exec.pipeline": ["lark", "kvpolicy.dsl.parser", "sglang"],
    "kvpolicy.hf.generate": ["lark", "kvpolicy.dsl.parser", "sglang"],
    "kvpolicy.kernels.select": ["lark", "kvpolicy.dsl.parser", "kvpolicy.lang.registry", "sglang"],
    "kvpolicy.kernels.merge": ["lark", "kvpolicy.dsl.parser", "kvpolicy.lang.registry", "sglang"],
    "kvpolicy.kernels.attention": ["lark", "kvpolicy.dsl.parser", "kvpolicy.lang.registry", "sglang"],
    "kvpolicy.sglang_ext.runtime": ["lark", "kvpolicy.dsl.parser", "kvpolicy.lang.registry", "kvpolicy.sglang_ext.server"],
    "kvpolicy.sglang_ext.hooks": ["lark", "kvpolicy.dsl.parser", "kvpolicy.lang.registry", "kvpolicy.sglang_ext.server"],
}

#: outside imports a layer may not use at all
FORBIDDEN_OUTSIDE = {"ir": ["lark", "torch", "sglang"], "checks": ["lark", "sglang"], "compile": ["lark", "sglang"],
                     "execute": ["lark", "sglang"]}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, rank = len(name), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (tests/test_layers.py)")
    return rank


def imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``module`` imports, anywhere in the file, with its line."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:  # `from pkg import submodule` depends on the submodule, not on pkg's face
                sub = f"{target}.{a.name}"
                found.append((sub if sub in MODULES else target, node.lineno))
    return found


MODULES = modules()


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_layer_above_its_own(module):
    mine = layer_of(module)
    problems = []
    for target, line in imports(module, MODULES[module]):
        if target in MODULES and layer_of(target) > mine:
            problems.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} "
                            f"({LAYERS[layer_of(target)][0]}, above {LAYERS[mine][0]})")
        top = target.split(".")[0]
        if top in FORBIDDEN_OUTSIDE.get(LAYERS[mine][0], ()):
            problems.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target} "
                            f"(never in the {LAYERS[mine][0]} layer)")
    assert not problems, "\n".join(problems)


def test_what_the_engine_side_never_loads():
    """In one fresh interpreter per module: import it, list what got loaded."""
    code = ("import importlib, json, sys\n"
            "mod, banned = sys.argv[1], sys.argv[2:]\n"
            "importlib.import_module(mod)\n"
            "print(json.dumps([b for b in banned if b in sys.modules]))\n")
    problems = {}
    for module, banned in NEVER_LOADED.items():
        done = subprocess.run([sys.executable, "-c", code, module, *banned], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        loaded = done.stdout.strip().splitlines()[-1]
        if loaded != "[]":
            problems[module] = loaded
    assert not problems, problems


def test_the_plan_is_what_runs():
    """The compiled plan carries the run: its budgets, window, retrieval
    heads (read from the artifact at compile time) and the order of the steps
    ``Pipeline.compress`` runs, which ``explain`` prints."""
    import torch

    from kvpolicy.compile.compiler import STEP_OF, explain, plan
    from kvpolicy.exec.pipeline import Pipeline, compile_pipeline
    from kvpolicy.exec.reference.scores import LayerInputs
    from kvpolicy.lang.budgets import DEFAULT_MODEL
    from kvpolicy.lang.registry import load

    pl = plan(load("compresskv"), DEFAULT_MODEL, 1000)
    assert pl.run_order == ("protect", "score", "allocate", "classify", "compact")
    assert pl.window == 8 and not pl.needs_accumulated  # compresskv.kvp: local(window=8, heads=retrieval(...))
    ((heads, per_layer),) = pl.retrieval
    assert len(per_layer) == DEFAULT_MODEL.num_layers and len(per_layer[0]) == heads.top
    assert "run: protect -> score -> allocate -> classify -> compact (aggregate in score)" in explain(pl)
    assert set(STEP_OF.values()) - {None} == {name.lstrip("_") for name in vars(Pipeline) if name.lstrip("_") in
                                              STEP_OF.values()}
    # a step the plan leaves out does not run
    pipe = compile_pipeline(load("snapkv").with_budget(48), DEFAULT_MODEL, 100)
    ran = []
    for step in pipe.plan.run_order:
        original = getattr(Pipeline, f"_{step}")
        setattr(pipe, f"_{step}", lambda run, backend, _f=original, _s=step: (ran.append(_s), _f(pipe, run, backend)))
    g = torch.Generator().manual_seed(0)
    inputs = LayerInputs(torch.randn(3, 100, 64, generator=g), torch.randn(3, 100, 64, generator=g),
                         torch.randn(9, 32, 64, generator=g))
    out = pipe.compress(0, inputs)
    assert ran == list(pipe.plan.run_order) and out.counts.tolist() == [48, 48, 48]
