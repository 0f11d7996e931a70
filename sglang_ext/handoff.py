"""How a policy reaches SGLang's scheduler processes without the parser.

The launcher and the HTTP process read ``.kvp`` text (they may load the
parser); the schedulers only run IR (ARCHITECTURE.md, import rules). So:

* at launch, :mod:`kvpolicy.sglang_ext.launch` writes the checked policy's IR
  (:mod:`kvpolicy.lang.wire`) into :data:`ENV_POLICY_IR`; SGLang starts its
  schedulers after argument parsing, so they inherit it;
* per request, the HTTP process resolves ``custom_params`` ``kv_policy`` /
  ``kv_budget`` (a 400 for anything the server cannot serve) and writes the
  resolved policy's IR under :data:`REQUEST_IR`, removing any value a client
  sent there; the scheduler decodes it (:func:`request_policy`).
"""

from __future__ import annotations

from kvpolicy.lang import ir, wire
from kvpolicy.lang.errors import PolicyError

ENV_POLICY = "KVPOLICY_SERVE_POLICY"  # the --kv-policy value (a path or a shipped name), for logs and checks
ENV_POLICY_IR = "KVPOLICY_SERVE_POLICY_IR"  # the launch policy's IR, for the schedulers
ENV_POLICY_DIR = "KVPOLICY_SERVE_POLICY_DIR"  # --kv-policy-dir, checked at launch, read by the HTTP process
REQUEST_POLICY = "kv_policy"  # custom_params keys a request may set
REQUEST_BUDGET = "kv_budget"
REQUEST_IR = "_kvpolicy_ir"  # written by the HTTP process only

_decoded: dict[str, ir.Policy] = {}


def names_a_policy(custom_params) -> bool:
    """Whether a request's ``custom_params`` ask for a policy of their own."""
    return isinstance(custom_params, dict) and (REQUEST_POLICY in custom_params or REQUEST_BUDGET in custom_params)


def attach(custom_params: dict, policy: ir.Policy) -> None:
    """HTTP process: hand the request's resolved policy to the scheduler."""
    custom_params[REQUEST_IR] = wire.dumps(policy)


def request_policy(default: ir.Policy, custom_params) -> ir.Policy:
    """Scheduler: the policy a request runs under, the server's unless the
    HTTP process attached one. A request that names a policy but carries no
    attached IR did not pass the HTTP process's check: :class:`PolicyError`
    (the request is then served exact, never under a policy it did not ask for)."""
    if not names_a_policy(custom_params):
        return default
    text = custom_params.get(REQUEST_IR)
    if not isinstance(text, str):
        raise PolicyError(f"the request names {REQUEST_POLICY}/{REQUEST_BUDGET} but its policy was not resolved "
                          "by the HTTP server")
    if text not in _decoded:
        if len(_decoded) >= 256:
            _decoded.clear()
        _decoded[text] = wire.loads(text)
    return _decoded[text]
