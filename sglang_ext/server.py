"""Start an SGLang server (with or without ``--kv-policy``) on loopback and
talk to it: what the serving tests and ``bench/serve.py`` share.

Only the standard library is used for HTTP, so a client needs nothing SGLang
installs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


def held_slots(state: dict) -> int:
    """Slots of a :meth:`Server.kv_state` that are neither free nor cached by
    the radix tree: the ones requests hold."""
    return state["max_total_num_tokens"] - state["available_slots"] - state["evictable_slots"] - state["protected_slots"]


@dataclass
class Server:
    """A running server: ``port``, its process and its log file."""

    port: int
    process: subprocess.Popen
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- HTTP ------------------------------------------------------------------

    def request(self, path: str, body: dict | None = None, timeout: float = 600) -> dict:
        """POST ``body`` as JSON (GET without one); returns the JSON reply, or
        ``{"status": code, "error": text}`` for an HTTP error."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as exc:
            return {"status": exc.code, "error": exc.read().decode(errors="replace")}
        try:
            return json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            return {"message": raw.decode(errors="replace")}

    def generate(self, input_ids: list[int], max_new_tokens: int = 16, **params) -> dict:
        """Greedy ``/generate`` on token ids; ``params`` go into the sampling
        parameters (``custom_params={"kv_policy": ...}`` picks a policy)."""
        sampling = {"temperature": 0, "max_new_tokens": max_new_tokens, **params}
        return self.request("/generate", {"input_ids": list(input_ids), "sampling_params": sampling})

    def kv_state(self) -> dict:
        """The scheduler's kvpolicy state (``/server_info``): the policy, the
        pool's free / evictable / protected slots and each compressed request."""
        info = self.request("/server_info")
        return info["internal_states"][0].get("kvpolicy") or {}

    def flush_cache(self) -> None:
        self.request("/flush_cache", {})

    def wait_idle(self, timeout: float = 120) -> dict:
        """Poll :meth:`kv_state` until no request runs or holds a slot (or
        ``timeout`` passes); return the last state."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.kv_state()
            if not state.get("running") and held_slots(state) == 0 or time.monotonic() > deadline:
                return state
            time.sleep(0.5)

    def completion_chunks(self, prompt_ids: list[int], max_tokens: int, timeout: float = 600, **extra):
        """Stream a greedy OpenAI ``/v1/completions``: yields each parsed
        chunk; leaving the loop early hangs up (the server aborts the request)."""
        body = {"model": "default", "prompt": list(prompt_ids), "max_tokens": max_tokens, "temperature": 0,
                "stream": True, **extra}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            for raw in reply:
                line = raw.decode().strip()
                if line.startswith("data:") and line != "data: [DONE]":
                    yield json.loads(line[5:])

    # -- lifetime --------------------------------------------------------------

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def command(model: str | Path, *, policy: str | None = None, extra: list[str] = (), port: int) -> list[str]:
    """The launch command: SGLang's launcher through kvpolicy's entry point
    (CPU defaults added there), the embedded model's settings for this CPU."""
    cmd = [sys.executable, "-m", "kvpolicy.sglang_ext.launch_server", "--model-path", str(model),
           "--port", str(port), "--dtype", "float32", "--skip-server-warmup", *extra]
    if policy is not None:
        cmd += ["--kv-policy", str(policy)]
    return cmd


def start(model: str | Path, log_path: Path, *, policy: str | None = None, extra: list[str] = (),
          timeout: float = 600) -> Server:
    """Start a server and wait until it answers; raise :class:`ServerError`
    with the end of its log if it exits or does not come up in time."""
    port = free_port()
    cmd = command(model, policy=policy, extra=list(extra), port=port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(port, proc, log_path, cmd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"server exited with {proc.returncode}:\n{server.log()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url + "/model_info", timeout=5):
                return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            time.sleep(1)
    server.stop()
    raise ServerError(f"server did not answer within {timeout:.0f} s:\n{server.log()[-3000:]}")
