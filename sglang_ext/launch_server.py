"""``python -m kvpolicy.sglang_ext.launch_server [SGLang flags] --kv-policy P``
(also ``kvpolicy serve``): SGLang's own launcher with kvpolicy's plugin.

``--kv-policy`` is a flag of SGLang's launcher itself once kvpolicy is
installed (the plugin adds it), so ``python -m sglang.launch_server ...
--kv-policy P`` works as well; this entry point only adds CPU defaults: on a
machine without CUDA it sets ``SGLANG_USE_CPU_ENGINE=1`` and, unless given,
``--device cpu --attention-backend torch_native`` (ARCHITECTURE.md § SGLang
on a CPU-only machine), and with ``--dp-size N`` on one NUMA node it splits
the cores between the N schedulers (``SGLANG_CPU_OMP_THREADS_BIND``, which
SGLang's CPU engine requires for more ranks than NUMA nodes) unless set.
"""

from __future__ import annotations

import os
import runpy
import sys
import warnings


def cpu_defaults(argv: list[str]) -> list[str]:
    import torch

    if torch.cuda.is_available():
        return argv
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    argv = list(argv)
    for flag, value in (("--device", "cpu"), ("--attention-backend", "torch_native")):
        if not any(a == flag or a.startswith(flag + "=") for a in argv):
            argv += [flag, value]
    ranks = _int_flag(argv, ("--dp-size", "--dp"))
    if ranks > 1 and "SGLANG_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = core_split(len(os.sched_getaffinity(0)), ranks)
    return argv


def core_split(cores: int, ranks: int) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` giving each of ``ranks`` schedulers its
    share of ``cores`` (at least one core each): ``"0-7|8-15"``, ``"0|1"``."""
    per = max(cores // ranks, 1)
    parts = []
    for r in range(ranks):
        lo = (r * per) % max(cores, 1)
        hi = lo + per - 1
        parts.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return "|".join(parts)


def _int_flag(argv: list[str], names: tuple[str, ...]) -> int:
    for i, a in enumerate(argv):
        for name in names:
            if a == name and i + 1 < len(argv) and argv[i + 1].isdigit():
                return int(argv[i + 1])
            if a.startswith(name + "=") and a.split("=", 1)[1].isdigit():
                return int(a.split("=", 1)[1])
    return 1


def main(argv: list[str] | None = None) -> None:
    argv = cpu_defaults(sys.argv[1:] if argv is None else argv)
    allowed = os.environ.get("SGLANG_PLUGINS")
    if allowed and "kvpolicy" not in allowed.split(","):
        os.environ["SGLANG_PLUGINS"] = f"{allowed},kvpolicy"
    sys.argv = ["sglang.launch_server", *argv]
    warnings.filterwarnings("ignore", message=".*sglang serve.*is the recommended entrypoint")
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
