"""A policy's IR as JSON and back, for processes that must not parse.

SGLang's scheduler processes run the policy but never load the parser
(ARCHITECTURE.md, import rules): the launcher and the HTTP process, which
read ``.kvp`` text, hand the scheduler the IR itself, encoded here. The
encoding is generic over the IR's frozen dataclasses (``{"_": "ClassName",
field: value, ...}``; tuples as lists), so a new IR node needs nothing here.
Decoding accepts only IR classes, and the result is validated where it is
used (the compiler), like any policy.
"""

from __future__ import annotations

import dataclasses
import json

from kvpolicy.lang import ir

_CLASSES = {cls.__name__: cls for cls in vars(ir).values()
            if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == ir.__name__}


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {"_": type(value).__name__}
        for f in dataclasses.fields(value):
            if f.compare:  # ``source`` (where the text came from) is not part of the policy
                out[f.name] = _plain(getattr(value, f.name))
        return out
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"not IR data: {value!r}")


def _ir(value):
    if isinstance(value, dict):
        name = value.get("_")
        cls = _CLASSES.get(name)
        if cls is None:
            raise ValueError(f"not an IR class: {name!r}")
        kwargs = {k: _ir(v) for k, v in value.items() if k != "_"}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ValueError(f"bad fields for {name}: {exc}") from None
    if isinstance(value, list):
        return tuple(_ir(v) for v in value)
    return value


def dumps(policy: ir.Policy) -> str:
    """The policy as one line of JSON."""
    return json.dumps(_plain(policy), separators=(",", ":"))


def loads(text: str) -> ir.Policy:
    """The policy :func:`dumps` wrote (``ValueError`` for anything else)."""
    policy = _ir(json.loads(text))
    if not isinstance(policy, ir.Policy):
        raise ValueError("the JSON does not hold a policy")
    return policy
