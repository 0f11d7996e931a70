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
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kvpolicy.sglang_ext.invariants import broken_invariants, held_slots, invariant_problems

__all__ = ["Background", "OVERCOMMIT", "STRICT_CHECKS", "Server", "ServerError", "broken_invariants", "command",
           "free_port", "held_slots", "invariant_problems", "start"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


#: The upper bound on one request, in seconds: generous, never a phase. A few
#: hundred decode steps of three requests on a loaded 2-core machine have
#: taken over 600 s, so the bound is half an hour; a hang still fails loudly.
REQUEST_TIMEOUT = 1800


#: SGLang's own allocator checks, every scheduler step: free + cached + held
#: = total (a leak stops the scheduler), no double free, no use after free;
#: and kvpolicy's (:func:`invariant_problems`) at every compression and release.
STRICT_CHECKS = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1", "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",
                 "KVPOLICY_CHECK_INVARIANTS": "1"}


#: Admission reserves at most 32 tokens of each request's output (SGLang
#: otherwise reserves up to 4096), so a small pool admits more than it can
#: decode to the end: SGLang then evicts the radix tree and retracts.
OVERCOMMIT = {"SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION": "32"}


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

    def request(self, path: str, body: dict | None = None, timeout: float = REQUEST_TIMEOUT) -> dict:
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

    def generate(self, input_ids: list[int], max_new_tokens: int = 16, rid: str | None = None, *,
                 timeout: float = REQUEST_TIMEOUT, **params) -> dict:
        """Greedy ``/generate`` on token ids; ``params`` go into the sampling
        parameters (``custom_params={"kv_policy": ...}`` picks a policy);
        ``rid`` names the request (for ``/abort_request`` and the events in
        :meth:`kv_state`)."""
        sampling = {"temperature": 0, "max_new_tokens": max_new_tokens, **params}
        body = {"input_ids": list(input_ids), "sampling_params": sampling}
        if rid is not None:
            body["rid"] = rid
        return self.request("/generate", body, timeout=timeout)

    def generate_in_background(self, input_ids: list[int], max_new_tokens: int = 16, rid: str | None = None,
                               **params) -> Background:
        """:meth:`generate` on a thread (to cancel it, or to watch the
        server while it runs)."""
        return Background(self, list(input_ids), max_new_tokens, rid, params)

    def abort(self, rid: str) -> None:
        self.request("/abort_request", {"rid": rid})

    def abort_all(self) -> None:
        """Abort every request on the server (``n > 1`` samples get rids of
        SGLang's choosing, so they cannot be aborted by the rid sent)."""
        self.request("/abort_request", {"rid": "", "abort_all": True})

    def events(self, rid: str) -> list[dict]:
        """kvpolicy's events for one request (capture, compressed,
        not_compressed, released), oldest first."""
        return [e for e in self.kv_state().get("events", []) if e["rid"] == rid]

    def wait_until(self, condition, what: str, timeout: float = 300, poll: float = 0.05) -> dict:
        """Poll :meth:`kv_state` until ``condition(state)`` holds; return that
        state. ``timeout`` is a generous upper bound, never a phase: running
        past it raises :class:`ServerError` naming ``what`` was awaited."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.kv_state()
            if condition(state):
                return state
            if time.monotonic() > deadline:
                state = {k: v for k, v in state.items() if k != "events"}
                raise ServerError(f"waited {timeout:.0f} s for {what}; {held_slots(state)} slots held; "
                                  f"last state: {state}")
            time.sleep(poll)

    def wait_for_event(self, rid: str, event: str, timeout: float = 300) -> list[dict]:
        """Wait until request ``rid`` has had ``event``; return its events."""
        def seen(state):
            return any(e["rid"] == rid and e["event"] == event for e in state.get("events", []))
        state = self.wait_until(seen, f"a '{event}' event of {rid}", timeout)
        return [e for e in state.get("events", []) if e["rid"] == rid]

    def wait_queued(self, rid: str, timeout: float = 300) -> dict:
        """Wait until request ``rid`` sits in the scheduler's waiting queue."""
        return self.wait_until(lambda s: rid in s["scheduler"]["waiting"], f"{rid} to be queued", timeout)

    def wait_decoded(self, rid: str, tokens: int, timeout: float = 300, unless=None) -> dict:
        """Wait until request ``rid`` is decoding with at least ``tokens``
        generated (read from the scheduler's running batch), or until
        ``unless()`` holds (e.g. a background request that already ended)."""
        def ready(state):
            return state["scheduler"]["running"].get(rid, -1) >= tokens or (unless is not None and unless())
        return self.wait_until(ready, f"{rid} to decode {tokens} tokens", timeout)

    def kv_state(self) -> dict:
        """The scheduler's kvpolicy state (``/server_info``): the policy, the
        pool's free / evictable / protected slots and each compressed request.
        With data parallelism, the first scheduler's (:meth:`kv_states`: all)."""
        return self.kv_states()[0]

    def kv_states(self) -> list[dict]:
        """Every scheduler's kvpolicy state, one per data-parallel rank."""
        info = self.request("/server_info")
        return [state.get("kvpolicy") or {} for state in info["internal_states"]]

    def flush_cache(self) -> None:
        self.request("/flush_cache", {})

    def wait_idle(self, timeout: float = 300) -> dict:
        """Wait until no request runs, waits or holds a slot; return that
        state (:class:`ServerError` past ``timeout``, with what was still held)."""
        def idle(state):
            sched = state.get("scheduler", {})
            return (not state.get("running") and held_slots(state) == 0
                    and not state["invariants"].get("captures_pending")
                    and not sched.get("waiting") and not sched.get("running") and not sched.get("prefilling"))
        return self.wait_until(idle, "the server to be idle", timeout, poll=0.2)

    def completion_chunks(self, prompt_ids: list[int], max_tokens: int, timeout: float = REQUEST_TIMEOUT, **extra):
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


class Background:
    """One :meth:`Server.generate` call running on a thread."""

    def __init__(self, server: Server, input_ids: list[int], max_new_tokens: int, rid: str | None, params: dict):
        self.reply: dict | list | None = None
        self.thread = threading.Thread(target=self._run, args=(server, input_ids, max_new_tokens, rid, params),
                                       daemon=True)
        self.thread.start()

    def _run(self, server, input_ids, max_new_tokens, rid, params):
        self.reply = server.generate(input_ids, max_new_tokens, rid=rid, **params)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def result(self, timeout: float = REQUEST_TIMEOUT) -> dict | list:
        """The reply (a list for ``n > 1``); :class:`ServerError` if none came in ``timeout``."""
        self.thread.join(timeout)
        if self.thread.is_alive() or self.reply is None:
            raise ServerError(f"no reply within {timeout:.0f} s")
        return self.reply


def command(model: str | Path, *, policy: str | None = None, extra: list[str] = (), port: int) -> list[str]:
    """The launch command: SGLang's launcher through kvpolicy's entry point
    (CPU defaults added there), the embedded model's settings for this CPU."""
    cmd = [sys.executable, "-m", "kvpolicy.sglang_ext.launch_server", "--model-path", str(model),
           "--port", str(port), "--dtype", "float32", "--skip-server-warmup", *extra]
    if policy is not None:
        cmd += ["--kv-policy", str(policy)]
    return cmd


def start(model: str | Path, log_path: Path, *, policy: str | None = None, extra: list[str] = (),
          timeout: float = 600, env: dict[str, str] | None = None) -> Server:
    """Start a server and wait until it answers; raise :class:`ServerError`
    with the end of its log if it exits or does not come up in time.
    ``env`` adds to the environment (e.g. :data:`STRICT_CHECKS`)."""
    port = free_port()
    cmd = command(model, policy=policy, extra=list(extra), port=port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
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
