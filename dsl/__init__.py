"""The policy language: grammar, parser (text -> IR), formatter (IR -> text).

Lark trees never leave this package; everything downstream consumes
:mod:`kvpolicy.ir`.
"""

from kvpolicy.dsl.formatter import format_policy
from kvpolicy.dsl.parser import parse, parse_file

__all__ = ["format_policy", "parse", "parse_file"]
