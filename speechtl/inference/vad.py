"""Voice activity detection for long recordings: where the speech is, and pieces of it
short enough for the encoder, cut at pauses.

The detector is Silero VAD, from the ``silero-vad`` package, which ships its models: its
"sequence" ONNX export runs through onnxruntime, many 32 ms frames per call, and
:func:`speech_spans` turns the per-frame speech probabilities into speech spans by
Silero's rules (cutting a span longer than the limit at its longest inner pause). Nothing
here imports torch, so ONNX model folders get the same cutting without it. The
recording is read from disk a block at a time, with the detector's state carried over,
so memory stays bounded whatever the length: one probability per 512 samples is kept.

Spans close together (a gap under twice the edge context, which is what running them
apart would cost) are joined into one piece, up to the length limit. Stretches outside
every piece are not run through the model at all.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

# no numpy or audio imports at the top: the command line reads VadOptions' defaults for its help
SAMPLE_RATE = 16000  # Silero's rate, and the one speechtl reads audio at
FRAME = 512  # samples per detector frame at 16 kHz
CONTEXT = 64  # samples of the previous frame each frame sees
BLOCK = FRAME * 1875  # 60 s read and run at a time
ROWS_PER_CALL = 512  # frames per detector call (16 s): bounds its working memory
INNER_PAUSE_S = 0.098  # a pause inside a span must pass this to be a place to cut it


@dataclass(frozen=True)
class VadOptions:
    """How long recordings are cut at pauses."""

    threshold: float = 0.5  # speech probability at and above which a frame is speech
    min_silence_s: float = 0.3  # a pause must last this long to end a span of speech
    speech_pad_s: float = 0.1  # kept around each span of speech
    min_speech_s: float = 0.25  # shorter bursts are dropped
    context_s: float = 0.25  # audio read beyond each piece's edges for context, its frames dropped

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"VAD threshold must lie between 0 and 1 (got {self.threshold:g})")
        if self.min_silence_s < 0:
            raise ValueError(f"VAD min_silence_s must not be negative (got {self.min_silence_s:g})")


@dataclass(frozen=True)
class Piece:
    """A stretch ``[start, end)`` of samples to transcribe, and the speech spans it holds."""

    start: int
    end: int
    spans: tuple[tuple[int, int], ...]


def model_path() -> Path:
    """Silero VAD's "sequence" ONNX model inside the installed ``silero-vad`` package, found
    without importing the package (its ``__init__`` imports torch)."""
    import importlib.util

    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("VAD needs the silero-vad package (pip install silero-vad), or --vad off")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad_16k_sequence.onnx"
    if not path.is_file():
        raise ImportError(f"{path}: silero-vad's sequence model is missing; reinstall silero-vad or use --vad off")
    return path


@functools.lru_cache(maxsize=1)
def _detector():
    """The detector, an onnxruntime session on one thread (it runs between batches of the
    recogniser, which has the cores); no torch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path()), sess_options=options, providers=["CPUExecutionProvider"])


def _frames(audio: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Rows of ``CONTEXT + FRAME`` samples: each 512-sample frame after the last 64 samples
    before it (``prev`` for the first); the last frame zero-padded."""
    import numpy as np

    n = -(-len(audio) // FRAME)
    frames = np.zeros((n, FRAME), np.float32)
    frames.reshape(-1)[: len(audio)] = audio
    ctx = np.empty((n, CONTEXT), np.float32)
    ctx[0] = prev
    ctx[1:] = frames[:-1, -CONTEXT:]
    return np.concatenate([ctx, frames], axis=1)


def speech_probs(read: Callable[[int, int], np.ndarray], total: int) -> np.ndarray:
    """One speech probability per 512-sample frame of a ``total``-sample recording, read
    by ``read(start, length)`` (samples) one 60-second block at a time, the detector's
    state carried across blocks and calls."""
    import numpy as np

    det = _detector()
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    prev = np.zeros(CONTEXT, np.float32)
    out: list[np.ndarray] = []
    for start in range(0, total, BLOCK):
        rows = _frames(read(start, min(BLOCK, total - start)), prev)
        prev = rows[-1, -CONTEXT:].copy()
        for k in range(0, len(rows), ROWS_PER_CALL):
            probs, h, c = det.run(["speech_probs", "hn", "cn"], {"input": rows[k:k + ROWS_PER_CALL], "h": h, "c": c})
            out.append(probs.reshape(-1))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def speech_spans(probs: Sequence[float], total: int, options: VadOptions, max_span_s: float) -> list[tuple[int, int]]:
    """Speech spans ``(start, end)`` in samples from per-frame probabilities, none longer
    than ``max_span_s`` with its padding.

    The rules are Silero's own (its ``get_speech_timestamps_from_probs``, which lives in a
    module that imports torch, so the ONNX runtime could not use it): speech starts at a
    frame at or above the threshold and ends where the probability has stayed below
    threshold - 0.15 for ``min_silence_s``; bursts no longer than ``min_speech_s`` are
    dropped; a span reaching the length limit is cut at its longest inner pause (of more
    than 98 ms), or where it stands when it has none; each span is padded by
    ``speech_pad_s``, or by half the gap where two spans are closer than twice that.
    A test holds this equal to Silero's function."""
    thr, neg = options.threshold, max(options.threshold - 0.15, 0.01)
    min_silence, min_speech = SAMPLE_RATE * options.min_silence_s, SAMPLE_RATE * options.min_speech_s
    pad = SAMPLE_RATE * options.speech_pad_s
    longest = SAMPLE_RATE * max_span_s - FRAME - 2 * pad
    spans: list[list[int]] = []
    start = None  # the open span's first sample
    quiet_from = 0  # where the current stretch below ``neg`` began inside the span (0: none)
    inner: list[tuple[int, int]] = []  # pauses inside the open span: (first sample, length)
    for i, p in enumerate(probs):
        t = FRAME * i
        if p >= thr and quiet_from:
            if t - quiet_from > SAMPLE_RATE * INNER_PAUSE_S:
                inner.append((quiet_from, t - quiet_from))
            quiet_from = 0
        if p >= thr and start is None:
            start = t
            continue
        if start is not None and t - start > longest:
            if inner:  # cut at the longest pause; speech goes on after it
                at, length = max(inner, key=lambda x: x[1])
                spans.append([start, at])
                start = at + length
                quiet_from, inner = 0, []
            else:  # none: cut here
                spans.append([start, t])
                start, quiet_from, inner = None, 0, []
                continue
        if p < neg and start is not None:
            quiet_from = quiet_from or t
            if t - quiet_from >= min_silence:
                if quiet_from - start > min_speech:
                    spans.append([start, quiet_from])
                start, quiet_from, inner = None, 0, []
    if start is not None and total - start > min_speech:
        spans.append([start, total])
    for k, sp in enumerate(spans):  # padding, shared where spans are close
        if k == 0:
            sp[0] = int(max(0, sp[0] - pad))
        if k + 1 < len(spans):
            gap = spans[k + 1][0] - sp[1]
            share = gap // 2 if gap < 2 * pad else pad
            sp[1] = int(sp[1] + share) if gap < 2 * pad else int(min(total, sp[1] + pad))
            spans[k + 1][0] = int(max(0, spans[k + 1][0] - share))
        else:
            sp[1] = int(min(total, sp[1] + pad))
    return [(int(s), int(e)) for s, e in spans if e > s]


def join_spans(spans: list[tuple[int, int]], max_piece: int, join_gap: int) -> list[Piece]:
    """Consecutive spans joined into pieces of at most ``max_piece`` samples while the gap
    between them is under ``join_gap``."""
    pieces: list[Piece] = []
    cur: list[tuple[int, int]] = []
    for s, e in spans:
        if cur and (s - cur[-1][1] >= join_gap or e - cur[0][0] > max_piece):
            pieces.append(Piece(cur[0][0], cur[-1][1], tuple(cur)))
            cur = []
        cur.append((s, e))
    if cur:
        pieces.append(Piece(cur[0][0], cur[-1][1], tuple(cur)))
    return pieces


def find_pieces(read: Callable[[int, int], np.ndarray], total: int, options: VadOptions, max_piece_s: float) -> list[Piece]:
    """The pieces of speech of a recording, each at most ``max_piece_s`` long, in order."""
    probs = speech_probs(read, total)
    # the detector's own cut of a long span leaves room for its padding on both sides
    spans = speech_spans(probs, total, options, max_piece_s)
    pieces = join_spans(spans, int(max_piece_s * SAMPLE_RATE), int(2 * options.context_s * SAMPLE_RATE))
    logger.debug("VAD: %d spans of speech in %d pieces (%.1f of %.1f s)", len(spans), len(pieces),
                 sum(e - s for s, e in spans) / SAMPLE_RATE, total / SAMPLE_RATE)
    return pieces


def pauses(pieces: list[Piece]) -> list[float]:
    """Times (s) between consecutive spans of speech: the middle of each pause."""
    spans = [sp for p in pieces for sp in p.spans]
    return [(a[1] + b[0]) / 2 / SAMPLE_RATE for a, b in zip(spans, spans[1:])]


def resolve(vad) -> VadOptions | None:
    """``"default"`` → the default options; None → no VAD; options as they are."""
    if isinstance(vad, str):
        if vad != "default":
            raise ValueError(f"vad must be VadOptions, None or 'default' (got {vad!r})")
        return VadOptions()
    return vad
