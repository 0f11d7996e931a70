"""CPU stand-in for `sgl_kernel` (see the kvpolicy-cpu-standins README): importable,
and any function called raises StandInCalled."""

import sys

from kvpolicy_standins import StandInModule, install

install(__name__)
sys.modules[__name__].__class__ = StandInModule
__version__ = "0.0.0+cpu-standin"
