"""``speechtl.manifest``, the old import path of :mod:`speechtl.data.manifest`: both names are one module."""

import sys

from .data import manifest as _module

sys.modules[__name__] = _module
