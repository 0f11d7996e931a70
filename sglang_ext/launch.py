"""Launch-time half of ``--kv-policy``: read and check the policy before any
model loads, check that the server's own flags leave room for it, and hand it
to the processes SGLang spawns.

The hand-off is two environment variables (:mod:`kvpolicy.sglang_ext.handoff`):
the policy's path or shipped name, and its checked IR as JSON; SGLang starts
its scheduler processes after argument parsing, so they inherit both, and the
plugin installs the compression hooks there when it sees them
(:mod:`kvpolicy.sglang_ext.hooks`). The schedulers never parse.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from kvpolicy.compile.compiler import decode_trigger_limit
from kvpolicy.lang import ir, wire
from kvpolicy.lang.errors import PolicyError
from kvpolicy.lang.registry import load, shipped_names
from kvpolicy.sglang_ext.handoff import ENV_POLICY, ENV_POLICY_DIR, ENV_POLICY_IR, REQUEST_BUDGET, REQUEST_POLICY

FLAG = "--kv-policy"
DIR_FLAG = "--kv-policy-dir"
DIR_HELP = ("kvpolicy: a folder of .kvp files that requests may pick by file name "
            "(custom_params kv_policy=NAME), besides the shipped policies; every file is checked at launch. "
            "Without --kv-policy, requests that name no policy are served exact.")
HELP = ("kvpolicy: compress each request's KV cache in SGLang's pool after its prefill with this policy "
        "(a .kvp file or a shipped name: " + ", ".join(shipped_names()) + "). "
        "The radix cache stays on; see the kvpolicy README, 'Serving'.")

log = logging.getLogger("kvpolicy")


class LaunchError(Exception):
    """A flag combination ``--kv-policy`` cannot serve."""


def add_flag(parser: argparse.ArgumentParser) -> None:
    if not any(FLAG in a.option_strings for a in parser._actions):
        parser.add_argument(FLAG, type=str, default=None, metavar="POLICY", help=HELP)
    if not any(DIR_FLAG in a.option_strings for a in parser._actions):
        parser.add_argument(DIR_FLAG, type=str, default=None, metavar="DIR", help=DIR_HELP)


def policy_args(argv: list[str]) -> tuple[str | None, str | None]:
    """The ``--kv-policy`` and ``--kv-policy-dir`` values in an SGLang command line (``None`` if absent)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_flag(parser)
    known, _ = parser.parse_known_args(argv)
    return known.kv_policy, known.kv_policy_dir


def policy_arg(argv: list[str]) -> str | None:
    """The ``--kv-policy`` value in an SGLang command line (``None`` if absent)."""
    return policy_args(argv)[0]


def folder_policies(folder: str | Path) -> dict[str, Path]:
    """The ``.kvp`` files of an operator's policy folder, by the name requests
    use (the file name without ``.kvp``). A name that is also a shipped
    policy's is refused: a request's ``kv_policy`` must mean one thing."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise PolicyError(f"{DIR_FLAG} {folder}: not a folder")
    files = {f.stem: f.resolve() for f in sorted(path.glob("*.kvp"))}
    if not files:
        raise PolicyError(f"{DIR_FLAG} {folder}: no .kvp files in it")
    if clash := sorted(set(files) & set(shipped_names())):
        raise PolicyError(f"{DIR_FLAG} {folder}: {', '.join(f + '.kvp' for f in clash)} would shadow the shipped "
                          "policy of that name; rename the file")
    return files


def check_folder(folder: str) -> dict[str, ir.Policy]:
    """Every policy of the folder read and checked as ``--kv-policy`` would be
    (:class:`PolicyError` with the first bad file's located error), by name."""
    checked = {}
    for name, path in folder_policies(folder).items():
        checked[name] = load(str(path))
        servable(checked[name])
    return checked


def variable_budgets(policy: ir.Policy) -> str | None:
    """Why ``policy``'s layers or KV heads may keep different numbers of tokens
    (served in the row layout: ARCHITECTURE.md § Variable budgets), or ``None``
    when every layer and head keeps the same number (the rank-slot layout)."""
    sel = policy.selection
    if sel is None:
        return None
    if not isinstance(policy.layers, ir.Uniform):
        return f"its layers get different budgets ({type(policy.layers).__name__.lower()} schedule)"
    if any(o.budget != policy.budget for o in policy.overrides):
        return "its layer overrides give some layers a different budget"
    if sel.unit == "pooled":
        return "its heads keep different numbers of tokens (per head pooled)"
    if sel.keep.p is not None:
        return f"top-p keeping (p={sel.keep.p}) gives heads different numbers of tokens"
    return None


def outside_graphs(policy: ir.Policy) -> str | None:
    """Why ``policy``'s requests must decode outside CUDA graphs (whose
    replays run no Python), or ``None``."""
    if variable := variable_budgets(policy):
        return f"{variable}: it is served in the row layout, whose decode attention runs outside SGLang's graphs"
    if policy.selection is not None and policy.trigger.decode_every is not None:
        return "its decode trigger keeps each decode step's queries, which a replayed graph never hands to the plugin"
    return None


def servable(policy: ir.Policy, cuda_graphs: bool = False) -> None:
    """Raise :class:`PolicyError` unless the pool path serves ``policy`` exactly.

    Every budget is served with its own savings: equal budgets in the
    rank-slot layout (SGLang's own attention reads it), per-layer and
    per-head budgets in the row layout, whose decode attention runs outside
    SGLang's backends, so not inside CUDA graphs (``cuda_graphs``: the server
    replays them). A decode trigger (``every N tokens``) is served for
    policies the transformers path runs exactly too
    (:func:`~kvpolicy.compile.compiler.decode_trigger_limit`) whose layers
    and heads keep one budget (ARCHITECTURE.md § Compressing during decoding).
    """
    if policy.selection is None:
        return
    why = None
    if policy.trigger.decode_every is not None and (limit := decode_trigger_limit(policy)):
        why = f"it recompresses during decoding, and {limit}"
    elif policy.trigger.decode_every is not None and (variable := variable_budgets(policy)):
        why = (f"it recompresses during decoding, and {variable}: decode-time recompression is served in the "
               "rank-slot layout only (every layer and KV head at one budget)")
    elif cuda_graphs and (outside := outside_graphs(policy)):
        why = (f"{outside}; such requests are decoded outside CUDA graphs, and this server replays them "
               "(launch it with --disable-cuda-graph, or with this policy as --kv-policy)")
    if why:
        raise PolicyError(
            f"policy '{policy.name}' cannot be served by SGLang's pool yet: {why}. "
            "Evaluate it with `kvpolicy eval`, or serve a policy without that",
            file=policy.source)


def request_policy(default: ir.Policy, custom_params, cuda_graphs: bool = False) -> ir.Policy:
    """The policy one request runs under: the server's, unless the request's
    ``custom_params`` name a shipped policy (``{"kv_policy": "snapkv"}``) and/or
    a budget (``{"kv_budget": "10%"}``). Raises :class:`PolicyError` (a 400
    to the client) for anything the server cannot serve. Requests cannot name
    files: a policy file is the operator's choice, made at launch."""
    params = custom_params if isinstance(custom_params, dict) else {}
    name, budget = params.get(REQUEST_POLICY), params.get(REQUEST_BUDGET)
    if name is None and budget is None:
        return default
    return _request_policy(default, name, budget, cuda_graphs)


def _request_policy(default: ir.Policy, name, budget, cuda_graphs: bool) -> ir.Policy:
    key = (id(default), name, budget, cuda_graphs)
    if key not in _request_policies:
        policy = default
        if name is not None:
            folder = _folder()
            names = sorted(folder) + shipped_names()
            if not isinstance(name, str) or name not in names:
                where = "the server's policy folder or the shipped policies" if folder else "the shipped policies"
                raise PolicyError.suggesting(
                    f"unknown {REQUEST_POLICY} '{name}': a request may name one of {where} "
                    f"({', '.join(names)})", str(name), names)
            policy = load(str(folder[name]) if name in folder else name)
        if budget is not None:
            policy = policy.with_budget(str(budget))
        servable(policy, cuda_graphs)
        _request_policies[key] = policy
    return _request_policies[key]


_request_policies: dict = {}


def _folder() -> dict[str, Path]:
    """The policy folder the launcher checked (its path is in the environment), by name."""
    folder = os.environ.get(ENV_POLICY_DIR)
    return folder_policies(folder) if folder else {}


def cuda_graphs_on(args) -> bool:
    """Whether a server with these arguments replays CUDA graphs for decoding."""
    device = getattr(args, "device", None)
    return device in (None, "cuda") and not getattr(args, "disable_cuda_graph", True)


def check_server_args(args, *policies: ir.Policy) -> list[str]:
    """Flags that conflict with ``--kv-policy``: raise :class:`LaunchError`
    for those that cannot be adjusted, adjust the rest in place and return
    what was changed (to be logged)."""
    problems = []
    if getattr(args, "page_size", 1) not in (None, 1):
        problems.append(f"--page-size {args.page_size}: compressed requests need page size 1")
    if getattr(args, "enable_mixed_chunk", False):
        problems.append("--enable-mixed-chunk: decode requests riding a prefill batch are not compressed yet")
    if getattr(args, "speculative_algorithm", None):
        problems.append("--speculative-algorithm: speculative decoding is not supported with a policy")
    if (getattr(args, "tp_size", 1) or 1) > 1:
        problems.append(f"--tp-size {args.tp_size}: tensor parallelism is not built: per-layer and pooled "
                        "selections need an all-reduce of scores across ranks, and every rank must pack the same "
                        "slots (ARCHITECTURE.md § Parallelism)")
    if (getattr(args, "pp_size", 1) or 1) > 1:
        problems.append(f"--pp-size {args.pp_size}: pipeline parallelism is not supported (one stage only)")
    if getattr(args, "enable_dp_attention", False):
        problems.append("--enable-dp-attention: data-parallel attention shares a tensor-parallel group; "
                        "use --dp-size alone (independent schedulers, each with its own pool)")
    if getattr(args, "disaggregation_mode", "null") not in (None, "null"):
        problems.append("--disaggregation-mode: prefill/decode disaggregation is not supported")
    if getattr(args, "enable_hierarchical_cache", False):
        problems.append("--enable-hierarchical-cache: host offload of compressed KV is not supported")
    if problems:
        raise LaunchError("--kv-policy cannot be combined with: " + "; ".join(problems))
    changed = []
    outside = [(p, why) for p in policies if (why := outside_graphs(p))]
    if outside and cuda_graphs_on(args):
        policy, why = outside[0]
        args.disable_cuda_graph = True
        changed.append(f"CUDA graphs disabled: '{policy.name}': {why}")
    return changed


def resolve(spec: str) -> str:
    """The value handed to the scheduler processes: an absolute path for a
    file, the name for a shipped policy."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_file() else spec


def prepare(argv: list[str], server_args) -> None:
    """Read, check and hand over the policy named by ``--kv-policy`` in
    ``argv``; exit with status 2 and the error on stderr if it is bad."""
    spec, folder = policy_args(argv)
    if spec is None and folder is None:
        for key in (ENV_POLICY, ENV_POLICY_IR, ENV_POLICY_DIR):
            os.environ.pop(key, None)
        return
    if spec is None:  # a folder alone: requests that name no policy are served exact
        spec = "full"
    try:
        policy = load(spec)
        servable(policy)
        files = check_folder(folder) if folder is not None else {}
        changed = check_server_args(server_args, policy, *files.values())
    except (PolicyError, LaunchError) as exc:
        print(f"error: --kv-policy {spec}: {exc}" if isinstance(exc, LaunchError) else str(exc),
              file=sys.stderr)
        sys.exit(2)
    os.environ[ENV_POLICY] = resolve(spec)
    os.environ[ENV_POLICY_IR] = wire.dumps(policy)
    if folder is not None:
        os.environ[ENV_POLICY_DIR] = str(Path(folder).expanduser().resolve())
    else:
        os.environ.pop(ENV_POLICY_DIR, None)
    log.info("kvpolicy: serving with policy '%s' (%s)", policy.name, os.environ[ENV_POLICY])
    if files:
        log.info("kvpolicy: requests may also pick %s from %s", ", ".join(sorted(files)), folder)
    for line in changed:
        log.info("kvpolicy: %s", line)
