"""``python -m kvpolicy.sglang_ext.launch_server [SGLang flags] --kv-policy P``
(also ``kvpolicy serve``): SGLang's own launcher with kvpolicy's plugin.

``--kv-policy`` is a flag of SGLang's launcher itself once kvpolicy is
installed (the plugin adds it), so ``python -m sglang.launch_server ...
--kv-policy P`` works as well; this entry point only adds CPU defaults: on a
machine without CUDA it sets ``SGLANG_USE_CPU_ENGINE=1`` and, unless given,
``--device cpu --attention-backend torch_native`` (ARCHITECTURE.md § SGLang
on a CPU-only machine).
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
    return argv


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
