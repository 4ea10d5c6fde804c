"""Voice activity detection for long recordings: where the speech is, and pieces of it
short enough for the encoder, cut at pauses.

The detector is Silero VAD, from the ``silero-vad`` package, which ships its models: its
"sequence" ONNX export runs through onnxruntime one block of 32 ms frames per call, and
its ``get_speech_timestamps_from_probs`` turns the per-frame speech probabilities into
speech spans (cutting a span longer than the limit at its longest inner pause). The
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
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

# no numpy or audio imports at the top: the command line reads VadOptions' defaults for its help
SAMPLE_RATE = 16000  # Silero's rate, and the one speechtl reads audio at
FRAME = 512  # samples per detector frame at 16 kHz
CONTEXT = 64  # samples of the previous frame each frame sees
BLOCK = FRAME * 1875  # 60 s read and run at a time


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


@functools.lru_cache(maxsize=1)
def _detector():
    # importing silero_vad sets torch's thread count to 1 (its model module does so for
    # its TorchScript model); the recogniser needs its threads back
    import torch

    threads = torch.get_num_threads()
    try:
        from silero_vad import load_silero_vad

        return load_silero_vad(sequence=True)
    finally:
        torch.set_num_threads(threads)


def speech_probs(read: Callable[[int, int], np.ndarray], total: int) -> np.ndarray:
    """One speech probability per 512-sample frame of a ``total``-sample recording, read
    by ``read(start, length)`` (samples) one 60-second block at a time."""
    import numpy as np
    from silero_vad.sequence_vad import frame_blocks

    det = _detector()
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    prev = np.zeros(CONTEXT, np.float32)
    out: list[np.ndarray] = []
    for start in range(0, total, BLOCK):
        audio = read(start, min(BLOCK, total - start))
        for k, block in enumerate(frame_blocks(audio, FRAME, CONTEXT, det.max_frames)):
            if k == 0:  # the block's first frame sees the end of the previous block
                block[0, :CONTEXT] = prev
            probs, h, c = det.session.run(["speech_probs", "hn", "cn"], {"input": block, "h": h, "c": c})
            out.append(probs.reshape(-1))
            prev = block[-1, -CONTEXT:].copy()
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def speech_spans(probs: np.ndarray, total: int, options: VadOptions, max_span_s: float) -> list[tuple[int, int]]:
    """Speech spans ``(start, end)`` in samples, none longer than ``max_span_s``."""
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    spans = get_speech_timestamps_from_probs(
        probs.tolist(), SAMPLE_RATE, threshold=options.threshold, min_speech_duration_ms=options.min_speech_s * 1000,
        max_speech_duration_s=max_span_s, min_silence_duration_ms=options.min_silence_s * 1000,
        speech_pad_ms=options.speech_pad_s * 1000, audio_length_samples=total)
    return [(int(s["start"]), int(s["end"])) for s in spans if s["end"] > s["start"]]


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
