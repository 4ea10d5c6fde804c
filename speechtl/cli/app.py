"""The ``speechtl`` command: the parser and :func:`main`. The command modules beside it
(:mod:`.prepare`, :mod:`.train`, :mod:`.extract`, :mod:`.decode`) add their subcommands;
these are the only modules that parse arguments or exit.

Each command imports what it uses when it runs: building the parser, ``--help`` and
commands such as ``prepare`` and ``lm build`` load neither torch nor transformers, which
take seconds to import.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

from ..core.constants import __version__
from . import decode, extract, prepare, serve, train
from .common import Parser, add_common

logger = logging.getLogger("speechtl")
THREADED = ("train", "extract", "evaluate", "transcribe", "align", "zeroshot", "export", "average")  # commands that run torch


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="speechtl", description="Adapt pretrained speech encoders to new languages and vocabularies, evaluate and transcribe.")
    p.add_argument("--version", action="version", version=f"speechtl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    prepare.add_prepare(sub)
    prepare.add_synth(sub)
    train.add_train(sub)
    extract.add_extract(sub)
    decode.add_evaluate(sub)
    decode.add_transcribe(sub)
    decode.add_align(sub)
    decode.add_lm(sub)
    train.add_export(sub)
    train.add_average(sub)
    decode.add_zeroshot(sub)
    serve.add_serve(sub)
    extract.add_fetch_encoder(sub)

    for name, sp in sub.choices.items():
        add_common(sp, threads=name in THREADED)
    return p


def _quiet_transformers(verbose: bool) -> None:
    """transformers' own load/save progress bars are noise next to ours, and so are its
    warnings unless -v. Told through its environment variables while it is not imported
    yet, so that commands that never use it do not pay seconds to import it."""
    if "transformers" not in sys.modules and "huggingface_hub" not in sys.modules:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if not verbose:
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    if not verbose:  # importing transformers resets its level; set it again
        hf_logging.set_verbosity_error()


def _is_audio_error(e: BaseException) -> bool:
    audio = sys.modules.get("speechtl.data.audio")  # not imported: nothing can have raised its error
    return audio is not None and isinstance(e, audio.AudioError)


def main(argv: list[str] | None = None) -> int:
    """Run the ``speechtl`` command on ``argv`` (default: ``sys.argv[1:]``). Called without
    ``argv`` it takes itself to be the process's entry point (the console script,
    ``python -m speechtl``) and tunes the garbage collector for a short-lived process
    (:func:`_start_up`, and a freeze before returning, which spares the interpreter's exit
    a walk over every object)."""
    as_program = argv is None
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may follow options: `train conf.yaml -q lr=1e-3`
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    args.as_program = as_program
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "urllib3", "numba", "filelock", "pyctcdecode"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _quiet_transformers(args.verbose)
    from ..core.cpus import request_threads

    request_threads(getattr(args, "threads", None))  # withdrawn again by a later main() without it
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        print(f"speechtl: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return getattr(e, "exit_status", 130)
    except Exception as e:
        if args.verbose:
            raise
        if isinstance(e, (ValueError, FileNotFoundError, RuntimeError, OSError)) or _is_audio_error(e):
            print(f"speechtl {args.command}: error: {e}", file=sys.stderr)
        else:  # a bug, not bad input: say how to see where
            print(f"speechtl {args.command}: unexpected error: {type(e).__name__}: {e}\n"
                  f"rerun with -v for the traceback", file=sys.stderr)
        return 1
    finally:
        if as_program:
            gc.freeze()
