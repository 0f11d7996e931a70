"""Stand-in modules: importable, every attribute a callable that raises.

``install(prefix)`` registers a finder so that ``prefix`` and any dotted
submodule of it import as :class:`StandInModule` instances.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class StandInCalled(RuntimeError):
    """A stand-in for a GPU-only function was called on the CPU."""


class _Missing:
    """Any attribute of a stand-in: attributes chain, calling raises."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise StandInCalled(f"{self._name} is a CPU stand-in (kvpolicy-cpu-standins); "
                            "install the real package on a GPU machine")

    def __mro_entries__(self, bases):
        # ``class X(torchvision.SomeBase)`` at import time: subclass object.
        return (object,)

    def __repr__(self):
        return f"<stand-in {self._name}>"


class StandInModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, prefix: str):
        self.prefix = prefix

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(self.prefix + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install(prefix: str) -> None:
    if not any(isinstance(f, _Finder) and f.prefix == prefix for f in sys.meta_path):
        sys.meta_path.append(_Finder(prefix))
