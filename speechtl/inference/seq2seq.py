"""The recogniser of seq2seq models (Whisper's own decoder, :mod:`speechtl.models.seq2seq`),
with :class:`speechtl.Recognizer`'s methods."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..data.audio import SAMPLE_RATE, AudioError
from ..data.manifest import Utterance
from ..data.text import Normalizer
from ..decoding.metrics import UtteranceResult, score, write_results
from ..decoding.options import DecodeOptions
from ..models import seq2seq as s2s
from ..models.seq2seq import load_seq2seq

logger = logging.getLogger(__name__)

class Seq2SeqRecognizer:
    """A loaded seq2seq model, with :class:`speechtl.Recognizer`'s ``transcribe``,
    ``evaluate`` and ``transcriber``. Decoding is Whisper's: greedy, or beam search with
    ``beam_width`` beams; n-gram LMs and hotwords belong to CTC models and are refused.
    A folder with a CTC head (``seq2seq_ctc``) decodes hybrid CTC/attention at its own
    ``ctc_weight`` (:mod:`speechtl.models.seq2seq_ctc`); set :attr:`ctc_weight` to None
    for the decoder alone."""

    def __init__(self, model, processor, normalizer: Normalizer, meta: dict, device: str | None = None,
                 model_dir: str | os.PathLike | None = None):
        from ..core.cpus import apply_budget
        from ..core.distributed import pick_device

        apply_budget()
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.normalizer = normalizer
        self.meta = meta
        self.model_dir = None if model_dir is None else Path(model_dir)
        self.lang = meta.get("language")
        # what the encoder sees of a clip: Whisper's 30 s window, or the batch's longest clip (seq2seq_window=clip)
        self.window = str(meta.get("window", "30"))
        if self.window not in s2s.WINDOWS:
            raise ValueError(f"{model_dir or 'seq2seq model'}: speechtl.json: window {self.window!r} is not one of "
                             f"{', '.join(s2s.WINDOWS)}")
        from ..models.seq2seq_ctc import Companion

        self.ctc = Companion.load(self.model_dir) if self.model_dir is not None else None
        if self.ctc is not None:
            self.ctc.head.to(self.device)
        self.ctc_weight = meta.get("ctc_weight") if self.ctc is not None else None
        # the folder's own decoding (decoding.json: Whisper's beam width), used unless told otherwise
        self.default_options = DecodeOptions.read(self.model_dir) if self.model_dir is not None else DecodeOptions()

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str | None = None, lang: str | None = None) -> "Seq2SeqRecognizer":
        model, processor, normalizer, meta = load_seq2seq(model_dir)
        if lang is not None and lang != meta.get("language"):
            raise ValueError(f"{model_dir}: this seq2seq model was trained for {meta.get('language')!r}, not {lang!r}")
        return cls(model, processor, normalizer, meta, device, model_dir)

    @property
    def language(self) -> str | None:
        return self.lang

    @property
    def languages(self) -> list[str]:
        return []

    def set_language(self, lang: str) -> "Seq2SeqRecognizer":
        raise ValueError("a seq2seq model has one language and no per-language adapters; set_language is for models "
                         "trained with mode=adapter")

    def decode_options(self, options: DecodeOptions | None = None, lm=None, beam_width: int | None = None,
                       alpha: float | None = None, beta: float | None = None, hotwords: Sequence[str] | None = None,
                       hotword_weight: float = 10.0) -> DecodeOptions:
        """As :meth:`speechtl.Recognizer.decode_options`."""
        if options is not None:
            return options
        return self.default_options.over(lm, beam_width, alpha, beta, hotwords, hotword_weight)

    def transcriber(self, chunk_length_s: float = 30.0, stride_length_s: float | None = None,
                    max_batch_seconds: float | None = None, lm=None, beam_width: int | None = None, alpha: float | None = None,
                    beta: float | None = None, hotwords: Sequence[str] | None = None, hotword_weight: float = 10.0,
                    streams: int | None = None, options: DecodeOptions | None = None,
                    vad="default") -> "Seq2SeqTranscriber":
        """Long recordings are cut at pauses into pieces of at most ``chunk_length_s`` (``vad``,
        as :meth:`speechtl.Recognizer.transcriber`), or with ``vad=None`` into back-to-back windows."""
        from .vad import resolve

        o = self.decode_options(options, lm, beam_width, alpha, beta, hotwords, hotword_weight)
        if o.lm is not None or o.hotwords:
            raise ValueError("a seq2seq model decodes with Whisper's own decoder; an n-gram LM (--lm) and hotwords are "
                             "for CTC models")
        if chunk_length_s > s2s.WINDOW_S:
            raise ValueError(f"chunk_length_s: Whisper's window is {s2s.WINDOW_S:g} s (got {chunk_length_s:g})")
        return Seq2SeqTranscriber(self, chunk_length_s, o.beam_width or 1, max_batch_seconds, resolve(vad))

    def transcribe(self, inputs, max_batch_seconds: float | None = None, progress: bool = False,
                   chunk_length_s: float = 30.0, stride_length_s: float | None = None, lm=None,
                   beam_width: int | None = None, alpha: float | None = None, beta: float | None = None,
                   hotwords: Sequence[str] | None = None, hotword_weight: float = 10.0, return_timestamps: bool = False,
                   options: DecodeOptions | None = None, vad="default"):
        """As :meth:`speechtl.Recognizer.transcribe`; segments carry times, words none."""
        from .transcribe import transcribe_inputs

        tr = self.transcriber(chunk_length_s, stride_length_s, max_batch_seconds, lm, beam_width, alpha, beta, hotwords,
                              options=options, vad=vad)
        return transcribe_inputs(tr, inputs, progress, return_timestamps)

    def evaluate(self, utterances: Sequence[Utterance], out_dir: str | os.PathLike | None = None, progress: bool = False,
                 on_bad_audio: str = "error", lm=None, beam_width: int | None = None, alpha: float | None = None,
                 beta: float | None = None, chunk_length_s: float = 30.0, max_batch_seconds: float | None = None,
                 options: DecodeOptions | None = None, vad="default") -> dict:
        """Score on a manifest, as :meth:`speechtl.Recognizer.evaluate`; the summary also
        counts hypotheses that loop (``looping``) or run far past their reference
        (``hallucinated``)."""
        from ..data.audio import check_readable
        from .transcribe import hyps_by_id

        good, skipped = check_readable(utterances, on_bad_audio, " (--on-bad-audio skip leaves them out)")
        tr = self.transcriber(chunk_length_s, None, max_batch_seconds, lm, beam_width, options=options, vad=vad)
        hyps = hyps_by_id(tr, good, progress)
        report = score([UtteranceResult(u.id, u.text, hyps[u.id], u.duration) for u in good], normalize=self.normalizer)
        hybrid = " + CTC (hybrid)" if self.ctc is not None and self.ctc_weight is not None else ""
        extra = {"decoder": ("whisper greedy" if tr.num_beams == 1 else "whisper beam") + hybrid, "beam_width": tr.num_beams,
                 **({"ctc_weight": self.ctc_weight, "ctc_chosen": tr.ctc_chosen} if self.ctc_weight is not None else {}),
                 "looping": sum(s2s.looping(r.hyp) for r in report.results),
                 "hallucinated": sum(s2s.hallucinated(r.ref, r.hyp) for r in report.results),
                 **({"skipped": skipped} if skipped else {})}
        if out_dir is not None:
            return write_results(report, Path(out_dir), extra)
        return {**report.summary(), **extra}


class Seq2SeqTranscriber:
    """Files in duration-sorted batches of short clips; long recordings cut at pauses (``vad``)
    or in back-to-back windows."""

    def __init__(self, rec: Seq2SeqRecognizer, chunk_length_s: float, num_beams: int, max_batch_seconds: float | None,
                 vad=None):
        self.rec = rec
        self.vad = vad
        self.chunk_s = chunk_length_s
        self.num_beams = num_beams
        self.batch_size = max(1, int((max_batch_seconds or 240.0) // s2s.WINDOW_S))
        self.ctc_chosen = 0  # windows whose text came from the CTC head (hybrid decoding)

    def run(self, items, progress: bool = False) -> Iterator:
        for _, t in self.run_indexed(items, progress):
            yield t

    def run_indexed(self, items, progress: bool = False) -> Iterator[tuple[int, object]]:
        from .transcribe import Segment, Transcript

        bar = tqdm(total=len(items), desc="transcribe", unit="file", disable=not progress)
        durations: dict[int, float] = {}
        for i, it in enumerate(items):
            try:
                durations[i] = it.duration()
            except AudioError as e:
                bar.update(1)
                yield i, Transcript(it.path, error=e.reason, id=_id(it))
        order = sorted(durations, key=durations.get)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            windows, owners, failed = self._windows(items, batch, durations)
            for i, reason in failed:
                bar.update(1)
                yield i, Transcript(items[i].path, error=reason, id=_id(items[i]))
            texts = self._decode([w for _, w in windows])
            gone = {i for i, _ in failed}
            by_item: dict[int, list] = {i: [] for i in batch if i not in gone}  # a recording without speech has no windows
            for (i, offset), (text, conf), (_, wav) in zip(owners, texts, windows):
                end = offset + len(wav) / SAMPLE_RATE
                by_item.setdefault(i, []).append(Segment(round(offset, 3), round(end, 3), text, round(conf, 4)))
            for i, segs in by_item.items():
                segs = [s for s in segs if s.text]
                bar.update(1)
                yield i, Transcript(items[i].path, " ".join(s.text for s in segs), round(durations[i], 3), segs, id=_id(items[i]))
        bar.close()

    def _windows(self, items, batch, durations):
        windows, owners, failed = [], [], []
        for i in batch:
            try:
                wav = items[i].read()
            except AudioError as e:
                failed.append((i, e.reason))
                continue
            step = int(self.chunk_s * SAMPLE_RATE)
            if self.vad is not None and len(wav) > step:  # pieces of speech, each decoded whole
                from .vad import find_pieces

                pieces = find_pieces(lambda a, n, w=wav: w[a:a + n], len(wav), self.vad, self.chunk_s)
                spans = [(p.start, p.end) for p in pieces]
            else:
                spans = [(a, a + step) for a in range(0, max(1, len(wav)), step)]
            for a, b in spans:
                windows.append((i, wav[a:b]))
                owners.append((i, a / SAMPLE_RATE))
        return windows, owners, failed

    def _decode(self, wavs: list[np.ndarray]) -> list[str]:
        rec = self.rec
        hybrid = rec.ctc is not None and rec.ctc_weight is not None
        out = []
        for k in range(0, len(wavs), self.batch_size):
            part = wavs[k:k + self.batch_size]
            hidden = s2s.encode(rec.model, rec.processor, part, rec.device, window=rec.window)
            samples = [len(w) for w in part]
            # hybrid: every beam is a candidate beside the CTC head's text
            res = s2s.generate(rec.model, rec.processor.tokenizer, hidden, samples, rec.lang, self.num_beams,
                               with_confidence=True, nbest=hybrid)
            out += self._hybrid(hidden, samples, res) if hybrid else res
        return out

    def _hybrid(self, hidden, samples: list[int], nbest: list[list[tuple[str, float]]]) -> list[tuple[str, float]]:
        """Per window, the decoder's beam or the CTC head's text that the joint score prefers."""
        from ..models.seq2seq_ctc import candidates

        rec = self.rec
        c = candidates(rec.model, rec.processor.tokenizer, rec.ctc, rec.normalizer, s2s.stack_hidden(hidden, samples),
                       samples, s2s.prefix_ids(rec.processor.tokenizer, rec.lang), [[t for t, _ in n] for n in nbest])
        out = []
        for j, n, texts, ctc_conf in zip(c.choice(rec.ctc_weight), nbest, c.texts, c.confidence):
            from_ctc = j == len(texts) - 1
            self.ctc_chosen += from_ctc
            out.append((texts[j], ctc_conf if from_ctc else n[j][1]))
        return out


def _id(item) -> str | None:
    return item.key if item.key != item.path else None

