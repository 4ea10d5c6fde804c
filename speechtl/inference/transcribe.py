"""Transcribing files, folders and manifests: duration batching, chunked long audio,
word and segment timestamps, and txt/json/srt/vtt output.

Short files (at most ``chunk_length_s``) are sorted by duration and batched by padded
seconds. Longer files are cut into overlapping windows, as in the transformers ASR
pipeline's ``chunk_length_s``/``stride_length_s``: each window is read from disk on its
own (``load_audio(offset=, duration=)``), so memory stays bounded whatever the length,
and the frames of its left and right strides are dropped, so the kept frames tile the
recording. With a ``vad`` (:mod:`speechtl.inference.vad`), long files are instead cut at
pauses: only the pieces of speech run, each with a little context, and the frames
between them are blank. Decoding then runs once over the stitched frame log-probabilities.

Times come from CTC frame spans: a character's time is the run of frames on which it
is the best class; a word runs from its first character's first frame to its last
character's last frame. A word's confidence is the mean, over those frames, of the
best class's probability.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..core.cpus import apply_budget
from ..core.memory import trim_heap
from ..core.threads import cpu_streams, in_order
from ..data.audio import AUDIO_EXTENSIONS, SAMPLE_RATE, AudioError, audio_info, load_audio
from ..data.batching import cut_batches
from ..data.text import Vocabulary
from ..decoding.decoders import GreedyDecoder, Word

logger = logging.getLogger(__name__)

FORMATS = ("txt", "json", "srt", "vtt")


@dataclass
class Segment:
    start: float
    end: float
    text: str
    confidence: float
    words: list[Word] = field(default_factory=list)


@dataclass
class Transcript:
    """One input's result; ``error`` is set (and the rest empty) when it failed."""

    path: str
    text: str = ""
    duration: float = 0.0
    segments: list[Segment] = field(default_factory=list)
    error: str | None = None
    id: str | None = None

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words]

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.error is None:
            d.pop("error")
        if self.id is None:
            d.pop("id")
        return d


# ----------------------------------------------------------------------------- inputs

@dataclass(frozen=True, eq=False)
class Item:
    key: str  # output name: a manifest id, or the path
    path: str
    audio: np.ndarray | None = None  # 16 kHz mono samples given in memory instead of a file

    def duration(self) -> float:
        return self.audio.size / SAMPLE_RATE if self.audio is not None else audio_info(self.path).duration

    def read(self, offset: float = 0.0, duration: float | None = None) -> np.ndarray:
        if self.audio is None:
            return load_audio(self.path, offset=offset, duration=duration)
        a = int(round(offset * SAMPLE_RATE))
        b = None if duration is None else a + int(round(duration * SAMPLE_RATE))
        return np.ascontiguousarray(self.audio[a:b], dtype=np.float32)


def collect_inputs(paths: Iterable[str | os.PathLike]) -> list[Item]:
    """Files, folders (searched recursively for audio) and ``.jsonl`` manifests.

    A path that does not exist is kept, so that it is reported as a failure in order.
    """
    from ..data.manifest import read_manifest

    items: list[Item] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                logger.warning("%s: no audio files found (looked for %s)", p, " ".join(AUDIO_EXTENSIONS))
            items += [Item(str(f), str(f)) for f in found]
        elif p.suffix == ".jsonl" and p.is_file():
            items += [Item(u.id, u.audio) for u in read_manifest(p, check_files=False)]
        else:
            items.append(Item(str(p), str(p)))
    return items


def gather_inputs(inputs) -> tuple[list[Item], bool]:
    """The items of :meth:`Recognizer.transcribe`'s ``inputs`` (a path, an array, or several),
    and whether they make one result (a single file or array) or a list (anything else,
    a folder or manifest included)."""
    one = isinstance(inputs, (str, os.PathLike, np.ndarray))
    raw = [inputs] if one else list(inputs)
    single = one and not (isinstance(inputs, (str, os.PathLike)) and (Path(inputs).is_dir() or str(inputs).endswith(".jsonl")))
    items: list[Item] = []
    for k, x in enumerate(raw):
        if isinstance(x, np.ndarray):
            items.append(Item(f"array-{k}", f"<array {k}>", np.asarray(x, dtype=np.float32).reshape(-1)))
        else:
            items += collect_inputs([x])
    return items, single


def results_in_order(tr, items: Sequence[Item], progress: bool, return_timestamps: bool) -> list:
    """Run a transcriber over ``items``: texts (or transcripts) in input order; an unreadable
    input raises :class:`AudioError` naming it."""
    out = [None] * len(items)
    for i, t in tr.run_indexed(items, progress=progress):
        if t.error is not None:
            raise AudioError(t.path, t.error)
        out[i] = t if return_timestamps else t.text
    return out


def transcribe_inputs(tr, inputs, progress: bool, return_timestamps: bool):
    """What ``Recognizer.transcribe`` returns for ``inputs`` (a path, array or several)
    through the transcriber ``tr``: one result for one input, else a list in input order."""
    items, single = gather_inputs(inputs)
    out = results_in_order(tr, items, progress, return_timestamps)
    return out[0] if single else out


def hyps_by_id(tr, utterances, progress: bool = False) -> dict[str, str]:
    """A transcriber's texts of manifest ``utterances``, by id (as :func:`results_in_order`)."""
    items = [Item(u.id, u.audio) for u in utterances]
    return dict(zip((it.key for it in items), results_in_order(tr, items, progress, False)))


# ----------------------------------------------------------------------------- decoding

def frame_seconds(model) -> float:
    """Seconds between encoder frames (the product of the CNN strides / 16 kHz)."""
    if model.encoder is not None:
        return 1.0 / model.encoder.frame_rate
    return 320 / SAMPLE_RATE


def segments_from_words(words: Sequence[Word], max_gap_s: float = 1.0, max_segment_s: float = 10.0,
                        breaks: Sequence[float] = ()) -> list[Segment]:
    """Split words into subtitle-sized segments at pauses longer than ``max_gap_s``, at
    each time in ``breaks`` that falls between two words (pauses a VAD found), or before a
    segment would exceed ``max_segment_s``."""
    segments: list[Segment] = []
    cur: list[Word] = []
    breaks = sorted(breaks)
    nb = 0  # breaks before the current word

    def close():
        if cur:
            segments.append(Segment(cur[0].start, cur[-1].end, " ".join(w.word for w in cur),
                                    round(float(np.mean([w.confidence for w in cur])), 4), list(cur)))
            cur.clear()

    for w in words:
        crossed = nb
        while nb < len(breaks) and breaks[nb] <= w.start:
            nb += 1
        if cur and (w.start - cur[-1].end > max_gap_s or w.end - cur[0].start > max_segment_s or nb > crossed):
            close()
        cur.append(w)
    close()
    return segments


# ----------------------------------------------------------------------------- windows

@dataclass
class _Window:
    wav: np.ndarray
    keep_from: int  # frames of this window's output to keep: [keep_from, keep_to)
    keep_to: int | None
    last: bool


class Transcriber:
    """Runs a loaded model over inputs and turns frame log-probs into transcripts."""

    def __init__(self, model, vocab: Vocabulary, device, decoder: Callable | None = None,
                 chunk_length_s: float = 30.0, stride_length_s: float | None = None,
                 max_batch_seconds: float | None = None, max_gap_s: float = 1.0, max_segment_s: float = 10.0,
                 streams: int | None = None, vad=None):
        apply_budget()
        self.model = model
        self.vad = vad  # a VadOptions: long files cut at pauses (None: fixed overlapping windows)
        self.vocab = vocab
        self.device = device
        self.decoder = decoder or GreedyDecoder(vocab)
        self.frame_s = frame_seconds(model)
        hop = round(self.frame_s * SAMPLE_RATE)
        stride = chunk_length_s / 6 if stride_length_s is None else stride_length_s
        if chunk_length_s <= 2 * stride:
            raise ValueError(f"chunk_length_s ({chunk_length_s}) must exceed twice stride_length_s ({stride})")
        limit = getattr(getattr(model, "encoder", None), "max_seconds", float("inf"))
        if chunk_length_s > limit:
            raise ValueError(f"chunk_length_s ({chunk_length_s:g}) is longer than this encoder takes at once ({limit:g} s)")
        # window and stride lengths are whole frames, so every window's frames line up with the file's
        self.chunk = int(chunk_length_s * SAMPLE_RATE) // hop * hop
        self.stride = int(stride * SAMPLE_RATE) // hop * hop
        self.hop = hop
        if self.chunk - 2 * self.stride < hop:
            raise ValueError(f"chunk_length_s ({chunk_length_s:g}) leaves windows of less than one frame ({self.frame_s:g} s) "
                             f"once the strides ({stride:g} s a side) are taken off; use a few seconds or more")
        # a window of `chunk` samples may make fewer than chunk / hop frames (wav2vec2's CNN needs
        # 400 samples for its first): read a little more, so that every window yields the frames
        # its place in the file calls for, whatever the stride (even 0)
        self.read_len = self.chunk
        frames_of = getattr(model, "frame_lengths", None)
        if frames_of is not None:
            want = self.chunk // hop
            while int(frames_of(self.read_len)) < want and self.read_len < self.chunk + 4 * hop:
                self.read_len += 1
            if int(frames_of(self.read_len)) < want:
                raise ValueError(f"this model makes {int(frames_of(self.read_len))} frames from {self.read_len} samples; "
                                 f"windows need {want}")
        if max_batch_seconds is None:
            from ..data.loader import encoder_batch_seconds

            max_batch_seconds = encoder_batch_seconds(device)
        self.max_batch_seconds = max_batch_seconds
        # short files' batches run this many at a time on a CPU, each on one thread
        self.streams = cpu_streams(device) if streams is None else streams
        if streams is not None and streams < 1:
            raise ValueError(f"streams must be at least 1 (got {streams})")
        self.max_gap_s = max_gap_s
        if vad is not None and chunk_length_s - 2 * vad.context_s < 0.5:
            raise ValueError(f"chunk_length_s ({chunk_length_s:g}) leaves pieces under 0.5 s beside the VAD's "
                             f"{vad.context_s:g} s of context each side")
        self.max_segment_s = max_segment_s

    def _log_probs(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        from ..data.loader import pad_waveforms

        values, lengths = pad_waveforms([torch.from_numpy(w) for w in wavs])
        with torch.inference_mode():
            logits, frames = self.model(values.to(self.device), lengths.to(self.device))
        lp = torch.log_softmax(logits.float(), dim=-1).cpu().numpy()
        return [lp[i, : int(n)] for i, n in enumerate(frames.cpu())]

    def _windows(self, item: Item, duration: float) -> Iterator[_Window]:
        """Overlapping windows of a long file, each read from disk when needed."""
        total = int(round(duration * SAMPLE_RATE))
        step = self.chunk - 2 * self.stride
        n = max(1, math.ceil((total - self.chunk) / step) + 1) if total > self.chunk else 1
        for k in range(n):
            start = k * step
            last = k == n - 1
            wav = item.read(start / SAMPLE_RATE, None if last else self.read_len / SAMPLE_RATE)
            keep_from = 0 if k == 0 else self.stride // self.hop
            keep_to = None if last else (self.chunk - self.stride) // self.hop
            yield _Window(wav, keep_from, keep_to, last)

    def run(self, items: Sequence[Item], progress: bool = False) -> Iterator[Transcript]:
        """Yield a :class:`Transcript` per item, failures included, as each finishes."""
        for _, t in self.run_indexed(items, progress):
            yield t

    def run_indexed(self, items: Sequence[Item], progress: bool = False) -> Iterator[tuple[int, Transcript]]:
        """As :meth:`run`, with each result's index into ``items`` (results come in batch order)."""
        infos: dict[int, float] = {}
        bar = tqdm(total=len(items), desc="transcribe", unit="file", disable=not progress)
        for i, it in enumerate(items):
            try:
                infos[i] = it.duration()
            except AudioError as e:
                bar.update(1)
                yield i, self._failed(it, e.reason)
        chunk_s = self.chunk / SAMPLE_RATE
        short = sorted((i for i, d in infos.items() if d <= chunk_s), key=lambda i: infos[i])
        long = [i for i, d in infos.items() if d > chunk_s]
        # short files: duration-sorted batches capped by padded seconds, each read and run on
        # one of `streams` threads side by side (a CPU's), decoded here in order
        batches = cut_batches(short, infos, self.max_batch_seconds)
        streams = self.streams if self.device.type == "cpu" else 1
        streams = streams if len(batches) > 1 else 1  # one batch runs on all threads
        for failed, done in in_order(lambda b: self._short_log_probs(items, b), batches, streams):
            for i, reason in failed:
                bar.update(1)
                yield i, self._failed(items[i], reason)
            for i, lp in done:
                bar.update(1)
                yield i, self._finish(items[i], lp, duration=infos[i])
        # long files: their windows (or pieces of speech) in batches, stitched, decoded once
        for i in long:
            try:
                if self.vad is not None:  # each piece of speech decoded as it comes
                    yield i, self._finish_words(items[i], *self._vad_words(items[i], infos[i]), duration=infos[i])
                else:
                    yield i, self._finish(items[i], *self.long_log_probs(items[i], infos[i]), duration=infos[i])
            except AudioError as e:
                yield i, self._failed(items[i], e.reason)
            bar.update(1)
        bar.close()

    def file_log_probs(self, item: Item, duration: float | None = None) -> np.ndarray:
        """Frame log-probabilities ``(T, V)`` of one input; long ones in stitched windows, or
        cut at pauses (with ``vad``: frames outside speech are blank)."""
        return self.long_log_probs(item, duration)[0]

    def long_log_probs(self, item: Item, duration: float | None = None) -> tuple[np.ndarray, list[float]]:
        """:meth:`file_log_probs`, and the times of the pauses the VAD found (none without)."""
        duration = item.duration() if duration is None else duration
        if self.vad is not None and duration > self.chunk / SAMPLE_RATE:
            return self._vad_log_probs(item, duration)
        return self._window_log_probs(item, duration), []

    def _vad_log_probs(self, item: Item, duration: float) -> tuple[np.ndarray, list[float]]:
        """Pieces of speech (at most a chunk each, context included) run in duration-sorted
        batches and written into place; every other frame is blank."""
        n_frames = self._n_frames(duration)
        out = np.full((n_frames, len(self.vocab)), -30.0, np.float32)
        out[:, self.vocab.blank_id] = 0.0  # silence: certainly blank (other classes still finite, for alignment)
        # a pause between pieces ends a word: CTC joins letters across any run of blanks, so
        # the frame before each piece is the word delimiter's
        delimiter = getattr(self.vocab, "delimiter_id", None)
        pieces = self._vad_pieces(item, duration)
        for first, kept in pieces:
            out[first: first + kept.shape[0]] = kept
            if delimiter is not None and first > pieces.spans[0][0]:  # not before the first
                out[first - 1, delimiter], out[first - 1, self.vocab.blank_id] = 0.0, -30.0
        return out, pieces.pauses

    def _vad_words(self, item: Item, duration: float) -> tuple[list, list[float]]:
        """Each piece of speech decoded on its own as soon as it is computed (memory stays
        that of one batch, however long the file), its words moved to the file's times."""
        words = []
        pieces = self._vad_pieces(item, duration)
        for first, kept in pieces:
            shift = first * self.frame_s
            words += [replace(w, start=round(w.start + shift, 3), end=round(w.end + shift, 3))
                      for w in self.decoder(kept, self.frame_s)]
        words.sort(key=lambda w: w.start)
        return words, pieces.pauses

    def _n_frames(self, duration: float) -> int:
        total = int(round(duration * SAMPLE_RATE))
        frames_of = getattr(self.model, "frame_lengths", None)
        return int(frames_of(total)) if frames_of is not None else total // self.hop

    def _vad_pieces(self, item: Item, duration: float) -> "_Pieces":
        from .vad import find_pieces, pauses

        total = int(round(duration * SAMPLE_RATE))
        n_frames = self._n_frames(duration)
        ctx = int(self.vad.context_s * SAMPLE_RATE) // self.hop * self.hop
        max_piece_s = (self.chunk - 2 * ctx) / SAMPLE_RATE

        def read(a: int, n: int) -> np.ndarray:
            return item.read(a / SAMPLE_RATE, n / SAMPLE_RATE)

        pieces = find_pieces(read, total, self.vad, max_piece_s)
        # frame bounds: [first, last) file frames kept, and the hop-aligned read around them
        firsts = [p.start // self.hop for p in pieces]
        spans = []
        for k, p in enumerate(pieces):
            # a piece cut inside speech ends where the next begins: no frame is kept twice
            first, last = firsts[k], min(n_frames, -(-p.end // self.hop), *firsts[k + 1:k + 2])
            r0 = max(0, first * self.hop - ctx)
            r1 = min(total, last * self.hop + ctx + (self.read_len - self.chunk))
            spans.append((first, last, r0, r1))
        return _Pieces(self, spans, read, pauses(pieces))

    def _window_log_probs(self, item: Item, duration: float) -> np.ndarray:
        per_batch = max(1, int(self.max_batch_seconds // (self.chunk / SAMPLE_RATE)))
        parts: list[np.ndarray] = []
        pending: list[_Window] = []
        for w in self._windows(item, duration):
            pending.append(w)
            if len(pending) == per_batch or w.last:
                for win, lp in zip(pending, self._log_probs([p.wav for p in pending])):
                    parts.append(lp[win.keep_from: win.keep_to])
                pending = []
                trim_heap()
        return np.concatenate(parts) if parts else np.zeros((0, len(self.vocab)), np.float32)

    def _short_log_probs(self, items, batch) -> tuple[list[tuple[int, str]], list[tuple[int, np.ndarray]]]:
        """Read a batch of short files and run the model: (failures, log-probs by index)."""
        wavs, ok, failed = [], [], []
        for i in batch:
            try:
                wavs.append(items[i].read())
                ok.append(i)
            except AudioError as e:
                failed.append((i, e.reason))
        return failed, list(zip(ok, self._log_probs(wavs))) if ok else []

    def _failed(self, item: Item, reason: str) -> Transcript:
        return Transcript(item.path, error=reason, id=item.key if item.key != item.path else None)

    def _finish(self, item: Item, log_probs: np.ndarray, breaks: Sequence[float] = (), *, duration: float) -> Transcript:
        return self._finish_words(item, self.decoder(log_probs, self.frame_s), breaks, duration=duration)

    def _finish_words(self, item: Item, words: list, breaks: Sequence[float] = (), *, duration: float) -> Transcript:
        segments = segments_from_words(words, self.max_gap_s, self.max_segment_s, breaks)
        return Transcript(item.path, " ".join(w.word for w in words), round(duration, 3), segments,
                          id=item.key if item.key != item.path else None)


class _Pieces:
    """A file's pieces of speech, run in duration-sorted batches: iterating yields
    ``(first_frame, log_probs)`` for each piece, the frames it keeps only, in batch order."""

    def __init__(self, tr: "Transcriber", spans: list, read: Callable, pauses: list[float]):
        self.tr, self.spans, self.read, self.pauses = tr, spans, read, pauses

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        tr, spans = self.tr, self.spans
        secs = [(r1 - r0) / SAMPLE_RATE for _, _, r0, r1 in spans]
        order = sorted(range(len(spans)), key=lambda k: secs[k])
        for batch in cut_batches(order, secs, tr.max_batch_seconds):
            wavs = [self.read(spans[k][2], spans[k][3] - spans[k][2]) for k in batch]
            for k, lp in zip(batch, tr._log_probs(wavs)):
                first, last, r0, _ = spans[k]
                off = r0 // tr.hop
                yield first, lp[first - off: last - off]
            trim_heap()  # a long file's many batch shapes would otherwise leave the heap growing


# ----------------------------------------------------------------------------- output

def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(t: Transcript) -> str:
    blocks = [f"{n}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n"
              for n, s in enumerate(t.segments, 1)]
    return "\n".join(blocks)


def to_vtt(t: Transcript) -> str:
    blocks = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n" for s in t.segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render(t: Transcript, fmt: str) -> str:
    if fmt == "txt":
        return t.text + "\n"
    if fmt == "json":
        return json.dumps(t.to_dict(), ensure_ascii=False, indent=2) + "\n"
    if fmt == "srt":
        return to_srt(t)
    if fmt == "vtt":
        return to_vtt(t)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
