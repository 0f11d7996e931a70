"""The policy language: grammar, parser (text -> IR), formatter (IR -> text).

Lark trees never leave this package; everything downstream consumes
:mod:`kvpolicy.lang.ir`. The parser (and Lark) load on first use of ``parse`` /
``parse_file``, so printing a policy (:func:`format_policy`) needs no Lark.
"""

from kvpolicy.dsl.formatter import format_policy

__all__ = ["format_policy", "parse", "parse_file"]


def __getattr__(name: str):
    if name in ("parse", "parse_file"):
        from kvpolicy.dsl import parser

        return getattr(parser, name)
    raise AttributeError(f"module 'kvpolicy.dsl' has no attribute '{name}'")
