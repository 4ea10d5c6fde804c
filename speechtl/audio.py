"""``speechtl.audio``, the old import path of :mod:`speechtl.data.audio`: both names are one module."""

import sys

from .data import audio as _module

sys.modules[__name__] = _module
