"""Running an exported ONNX folder (``speechtl export --format onnx``) without torch.

The folder holds ``model.onnx`` or ``model.int8.onnx``, sherpa-onnx's ``tokens.txt``,
``speechtl-onnx.json`` (vocabulary, frame geometry, default decoding), ``vocab.json``
(``tokenizer.json`` for subword units) and ``normalizer.json``. This module needs
onnxruntime, numpy, soundfile and soxr, and imports neither torch nor transformers (a
test checks ``sys.modules``): the transcriber, decoders, metrics and output formats are
the torch path's own, so texts, word times and confidences, JSON/SRT/VTT, beam search
with an LM and long files in windows come out the same way.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..core.cpus import cpu_threads
from ..data.manifest import Utterance
from ..data.text import UNK_TEXT, load_normalizer
from ..data.units import WORD_START, load_vocabulary
from ..decoding.decoders import Decoders
from ..decoding.metrics import UtteranceResult, score, write_results
from ..decoding.options import DecodeOptions
from .vad import resolve

logger = logging.getLogger(__name__)

ONNX_META_FILE = "speechtl-onnx.json"
CPU_BATCH_SECONDS = 10.0  # as the torch path's cap on a CPU (data.loader.encoder_batch_seconds)


class OnnxFolderError(ValueError):
    pass


def is_onnx_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an exported ONNX folder (it holds ``speechtl-onnx.json``)."""
    return (Path(path) / ONNX_META_FILE).is_file()


def read_onnx_meta(folder: str | os.PathLike) -> dict:
    """The folder's record, after checking that its model file and ``tokens.txt`` are there
    and that ``tokens.txt`` matches the vocabulary: a clear error before any work."""
    folder = Path(folder)
    meta = json.loads((folder / ONNX_META_FILE).read_text(encoding="utf-8"))
    model = folder / meta["model"]
    if not model.is_file():
        raise OnnxFolderError(f"{model}: missing ({ONNX_META_FILE} names it as the model); export the folder again")
    check_tokens(folder / meta.get("tokens", "tokens.txt"), meta["vocab"])
    return meta


def check_tokens(path: Path, vocab: Sequence[str]) -> None:
    """``tokens.txt`` must list the model's units in order: ``symbol id``, blank first."""
    if not path.is_file():
        raise OnnxFolderError(f"{path}: missing; an exported ONNX folder needs tokens.txt (sherpa-onnx's symbol table, "
                              f"{len(vocab)} lines); export the folder again with speechtl export --format onnx")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(lines) != len(vocab):
        raise OnnxFolderError(f"{path}: {len(lines)} tokens, but the model has {len(vocab)} output units")
    for i, (line, tok) in enumerate(zip(lines, vocab)):
        parts = line.split()
        want = "<blk>" if i == 0 else (UNK_TEXT if i == 1 else (WORD_START if tok == "|" else tok))
        if len(parts) != 2 or parts[1] != str(i) or parts[0] not in (want, tok):
            raise OnnxFolderError(f"{path}: line {i + 1} is {line!r}, but the model's unit {i} is {want!r} "
                                  f"(expected '{want} {i}')")


@dataclass(frozen=True)
class _Device:
    type: str = "cpu"


@dataclass(frozen=True)
class _EncoderInfo:
    frame_rate: float
    max_seconds: float


ARENA_KEEP_SECONDS = 10.0  # runs on longer input give the arena's memory back when they end


class OnnxModel:
    """An ONNX Runtime session over padded batches: ``log_probs(wavs)`` gives each clip's
    ``(T, V)`` frame log-probabilities.

    ``arena``: onnxruntime's memory arena (its default), which keeps the memory of one run
    for the next instead of asking the system for it again: short files on side-by-side
    streams ran 1.15x as fast with it through an int8 wav2vec2 (0.93x through the bundled
    encoder, whose tensors are small). A run on more than ``ARENA_KEEP_SECONDS`` of input
    (a long file's windows) gives the memory back when it ends, so that one 30 s window's
    peak is not kept for good; with that, a 60-minute file peaked lower than without an
    arena (benchmarks/README.md). ``False``: no arena."""

    def __init__(self, path: str | os.PathLike, meta: dict, threads: int | None = None, arena: bool = True):
        self.path, self.threads, self.arena = str(path), threads, bool(arena)
        self._sessions: dict[int | None, object] = {}
        self._lock = threading.Lock()
        out = self._session(threads).get_outputs()[0].shape
        if isinstance(out[-1], int) and out[-1] != len(meta["vocab"]):
            raise OnnxFolderError(f"{path}: the model has {out[-1]} output units but {ONNX_META_FILE} lists "
                                  f"{len(meta['vocab'])}")
        self.encoder = _EncoderInfo(float(meta["frame_rate"]), float(meta["max_seconds"]))
        self.rule = meta["frames"]
        self.one_clip = bool(meta.get("one_clip_per_batch"))

    @property
    def session(self):
        """The session :meth:`log_probs` uses on this thread: one intra-op thread on one of
        several streams side by side (:func:`speechtl.core.threads.in_stream`; on 2 cores two
        short files at once read 1.22x one file at a time on two threads), else ``threads``
        (default: onnxruntime's, all cores). Each is made when first needed."""
        from ..core.threads import in_stream

        return self._session(1 if in_stream() else self.threads)

    def _session(self, threads: int | None):
        with self._lock:
            if threads not in self._sessions:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.log_severity_level = 3  # the default-lengths input draws a warning on every load
                opts.enable_cpu_mem_arena = self.arena
                # threads that spin while waiting for work take the cores from everything else on a shared
                # machine (the transfer demo's test set: 20x real time spinning, 73x not, at load 19 on 2 cores)
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                if threads:
                    opts.intra_op_num_threads = threads
                self._sessions[threads] = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
            return self._sessions[threads]

    def _run_options(self, samples: int):
        """Runs on more than ``ARENA_KEEP_SECONDS`` of input give the arena's memory back when
        they end: a long file's 30 s windows would otherwise keep their peak for good."""
        if not self.arena or samples <= ARENA_KEEP_SECONDS * 16_000:
            return None
        import onnxruntime as ort

        opts = ort.RunOptions()
        opts.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return opts

    def frame_lengths(self, samples: int) -> int:
        if self.rule["kind"] == "whisper":
            mel = max(int(samples), 160) // 160
            return (mel - 1) // 2 + 1
        n = int(samples)
        for k, s in zip(self.rule["kernels"], self.rule["strides"]):
            n = max((n - k) // s + 1, 0)
        return n

    def log_probs(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self.one_clip and len(wavs) > 1:  # group-norm CNNs normalise over the whole input
            return [lp for w in wavs for lp in self.log_probs([w])]
        lengths = np.array([w.size for w in wavs], np.int64)
        # at least one wav2vec2 receptive field (400 samples) of input: the graph pads no shorter
        # input up itself; each clip's own length still counts
        values = np.zeros((len(wavs), max(int(lengths.max()), 400)), np.float32)
        for k, w in enumerate(wavs):
            values[k, : w.size] = w
        lp, frames = self.session.run(None, {"waveforms": values, "lengths": lengths}, self._run_options(values.size))
        return [lp[i, : int(n)] for i, n in enumerate(frames)]


def _transcriber_class():
    from .transcribe import Transcriber

    class OnnxTranscriber(Transcriber):
        def _log_probs(self, wavs: list[np.ndarray]) -> list[np.ndarray]:
            return self.model.log_probs(wavs)

    return OnnxTranscriber


class OnnxRecognizer:
    """:class:`~speechtl.inference.recognizer.Recognizer`'s interface over an exported ONNX folder."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None, arena: bool = True):
        self.model_dir = Path(folder)
        self.meta = read_onnx_meta(folder)
        units_meta = {"units": self.meta.get("units", "char")}
        self.vocab = load_vocabulary(folder, units_meta)
        if list(self.vocab.tokens) != list(self.meta["vocab"]):
            raise OnnxFolderError(f"{folder}: the vocabulary files disagree with {ONNX_META_FILE}'s vocab")
        self.normalizer = load_normalizer(self.model_dir / "normalizer.json")
        self.model = OnnxModel(self.model_dir / self.meta["model"], self.meta, threads, arena)
        self.device = _Device()
        self._decoders = Decoders(self.vocab)

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | None = None, lang: str | None = None) -> "OnnxRecognizer":
        if device not in (None, "cpu", "auto"):
            raise OnnxFolderError(f"{folder}: an ONNX folder runs on the CPU with onnxruntime (got device {device!r})")
        rec = cls(folder)
        if lang is not None and lang != rec.language:
            have = rec.language or "none (not an adapter model)"
            raise OnnxFolderError(f"{folder}: exported for language {have}; export the model again with --lang {lang}")
        return rec

    @property
    def language(self) -> str | None:
        return self.meta.get("language")

    @property
    def languages(self) -> list[str]:
        return [self.language] if self.language else []

    def default_options(self) -> DecodeOptions:
        """The folder's decoding (its LM, when exported with one), else greedy."""
        d = self.meta.get("decoding")
        if not d:
            return DecodeOptions()
        return DecodeOptions.of(self.model_dir / d["lm"], d.get("beam_width"), d.get("alpha", 0.5), d.get("beta", 1.0))

    def decode_options(self, options: DecodeOptions | None = None, lm=None, beam_width: int | None = None,
                       alpha: float | None = None, beta: float | None = None, hotwords=None,
                       hotword_weight: float = 10.0) -> DecodeOptions:
        """As :meth:`speechtl.inference.recognizer.Recognizer.decode_options`: ``options`` when
        given (``DecodeOptions()`` is greedy), else the folder's own with the arguments laid over it."""
        if options is not None:
            return options
        return self.default_options().over(lm, beam_width, alpha, beta, hotwords, hotword_weight)

    def decoder(self, options: DecodeOptions | None = None):
        return self._decoders.get(options or DecodeOptions())

    def transcriber(self, chunk_length_s: float = 30.0, stride_length_s: float | None = None,
                    max_batch_seconds: float | None = None, lm=None, beam_width=None, alpha: float | None = None,
                    beta: float | None = None, hotwords=None, hotword_weight: float = 10.0, streams: int | None = None,
                    options: DecodeOptions | None = None, vad="default"):
        """A transcriber over this folder's model. Short files' batches run ``streams`` at a
        time (default: one per core, at most 8), each on a one-thread session; a single batch,
        and a long file's windows, on all of ONNX Runtime's threads. ``vad`` as
        :meth:`speechtl.inference.recognizer.Recognizer.transcriber`: long files are cut at
        pauses by Silero VAD's ONNX model, which needs no torch."""
        o = self.decode_options(options, lm, beam_width, alpha, beta, hotwords, hotword_weight)
        return _transcriber_class()(self.model, self.vocab, self.device, self.decoder(o), chunk_length_s,
                                    stride_length_s, max_batch_seconds or CPU_BATCH_SECONDS,
                                    streams=streams or max(1, min(cpu_threads(), 8)),
                                    vad=resolve(vad))

    def transcribe(self, inputs: str | os.PathLike | np.ndarray | Iterable, max_batch_seconds: float | None = None,
                   progress: bool = False, chunk_length_s: float = 30.0, stride_length_s: float | None = None,
                   lm=None, beam_width=None, alpha: float | None = None, beta: float | None = None, hotwords=None,
                   hotword_weight: float = 10.0, return_timestamps: bool = False, options: DecodeOptions | None = None,
                   vad="default"):
        """As :meth:`speechtl.inference.recognizer.Recognizer.transcribe`."""
        from .transcribe import transcribe_inputs

        options = self.decode_options(options, lm, beam_width, alpha, beta, hotwords, hotword_weight)
        tr = self.transcriber(chunk_length_s, stride_length_s, max_batch_seconds, options=options, vad=vad)
        return transcribe_inputs(tr, inputs, progress, return_timestamps)

    def evaluate(self, utterances: Sequence[Utterance], out_dir: str | os.PathLike | None = None, progress: bool = False,
                 on_bad_audio: str = "error", lm=None, beam_width=None, alpha: float | None = None,
                 beta: float | None = None, chunk_length_s: float = 30.0, max_batch_seconds: float | None = None,
                 options: DecodeOptions | None = None, vad="default") -> dict:
        """As :meth:`speechtl.inference.recognizer.Recognizer.evaluate`."""
        from ..data.audio import check_readable
        from .transcribe import hyps_by_id

        good, skipped = check_readable(utterances, on_bad_audio, " (--on-bad-audio skip leaves them out)")
        options = self.decode_options(options, lm, beam_width, alpha, beta)
        tr = self.transcriber(chunk_length_s, None, max_batch_seconds, options=options, vad=vad)
        hyps = hyps_by_id(tr, good, progress)
        report = score([UtteranceResult(u.id, u.text, hyps[u.id], u.duration) for u in good], normalize=self.normalizer)
        extra = {**options.summary(), **({"skipped": skipped} if skipped else {})}
        if out_dir is not None:
            return write_results(report, Path(out_dir), extra)
        return {**report.summary(), **extra}


def load(model_dir: str | os.PathLike, device: str | None = None, lang: str | None = None):
    """An :class:`OnnxRecognizer` for an exported ONNX folder, else the torch
    :class:`~speechtl.inference.recognizer.Recognizer` (which imports torch)."""
    if is_onnx_dir(model_dir):
        return OnnxRecognizer.load(model_dir, device=device, lang=lang)
    from .recognizer import Recognizer

    return Recognizer.load(model_dir, device=device, lang=lang)
