"""The ``speechtl`` command (a thin layer over the library; modules here import torch only
inside the commands that need it, so that ``speechtl --help`` loads none of it)."""

from .app import main

__all__ = ["main"]
