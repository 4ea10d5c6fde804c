"""Running a trained model: batched transcription and evaluation on a manifest."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.cpus import apply_budget
from ..core.distributed import pick_device
from ..data.audio import AudioError
from ..data.loader import AudioDataset, collate, encoder_batch_seconds, sorted_loader
from ..data.manifest import Utterance
from ..data.text import Normalizer, Vocabulary
from ..decoding.decoders import Decoders, greedy_ids
from ..decoding.metrics import ScoreReport, UtteranceResult, score, write_results
from ..decoding.options import DecodeOptions
from ..features.extract import FeatureDataset, collate_features
from ..models.ctc import CTCModel
from ..models.model_dir import load_model_dir

logger = logging.getLogger(__name__)


@torch.inference_mode()
def decode_batch(model: CTCModel, vocab: Vocabulary, waveforms: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    logits, frames = model(waveforms, lengths)
    return [vocab.decode(ids) for ids in greedy_ids(logits, frames)]


def decode_hyps(
    model: CTCModel,
    vocab: Vocabulary,
    normalizer: Normalizer,
    utterances: Sequence[Utterance],
    device: torch.device | str = "cpu",
    max_batch_seconds: float | None = None,
    num_workers: int = 0,
    progress: bool = False,
    features=None,
    chunk_length_s: float = 30.0,
    vad=None,
) -> dict[str, str]:
    """Greedy hypotheses by utterance id, decoded in duration-sorted batches.

    ``features`` (frozen models): precomputed encoder outputs by utterance id (a dict or
    a :class:`speechtl.features.cache.FeatureCache`), used instead of running the encoder; clips
    without an entry are decoded from their audio. Audio longer than ``chunk_length_s``
    is decoded in overlapping windows read from disk one at a time (as ``transcribe``
    does), so a recording of hours needs no more memory than a window; with ``vad`` (a
    :class:`speechtl.inference.vad.VadOptions`) they are cut at pauses instead.
    """
    device = torch.device(device)
    if max_batch_seconds is None:
        max_batch_seconds = encoder_batch_seconds(device)
    from_features = [u for u in utterances if features is not None and u.id in features]
    from_audio = [u for u in utterances if features is None or u.id not in features]
    if from_audio and model.encoder is None:
        raise ValueError(f"{len(from_audio)} utterance(s) have no precomputed features and the model has no encoder"
                         f" (first: {from_audio[0].id})")
    long = [u for u in from_audio if u.duration > chunk_length_s]
    short = [u for u in from_audio if u.duration <= chunk_length_s]
    was_training = model.training
    model.eval()
    hyps: dict[str, str] = {}
    bar = tqdm(total=len(utterances), desc="decode", unit="utt", disable=not progress, leave=False)
    if from_features:
        for batch in sorted_loader(FeatureDataset(from_features, features), max_batch_seconds, collate_features, 0, device):
            b = batch.to(device, non_blocking=True)
            with torch.inference_mode():
                logits, frames = model.forward_features(b.hidden, b.frame_lengths)
            hyps.update(zip(b.ids, (vocab.decode(ids) for ids in greedy_ids(logits, frames))))
            bar.update(len(b.ids))
    if short:
        for batch in sorted_loader(AudioDataset(short, normalize=normalizer), max_batch_seconds, collate, num_workers, device):
            b = batch.to(device, non_blocking=True)
            hyps.update(zip(b.ids, decode_batch(model, vocab, b.waveforms, b.lengths)))
            bar.update(len(b.ids))
    if long:
        from .transcribe import Item, Transcriber

        windows = Transcriber(model, vocab, device, chunk_length_s=chunk_length_s, max_batch_seconds=max_batch_seconds,
                              vad=vad)
        for u in long:
            lp = torch.from_numpy(windows.file_log_probs(Item(u.id, u.audio)))
            hyps[u.id] = vocab.decode(greedy_ids(lp[None], torch.tensor([lp.shape[0]]))[0])
            bar.update(1)
    bar.close()
    model.train(was_training)
    return hyps


def score_hyps(utterances: Sequence[Utterance], hyps: dict[str, str], normalizer: Normalizer) -> ScoreReport:
    """Score hypotheses (by id) against the utterances' transcripts, in manifest order."""
    return score([UtteranceResult(u.id, u.text, hyps[u.id], u.duration) for u in utterances], normalize=normalizer)


def decode_utterances(model: CTCModel, vocab: Vocabulary, normalizer: Normalizer, utterances: Sequence[Utterance],
                      device: torch.device | str = "cpu", max_batch_seconds: float | None = None, num_workers: int = 0,
                      progress: bool = False, features=None, chunk_length_s: float = 30.0, vad=None) -> ScoreReport:
    """Greedy-decode ``utterances`` (see :func:`decode_hyps`) and score them."""
    hyps = decode_hyps(model, vocab, normalizer, utterances, device, max_batch_seconds, num_workers, progress, features,
                       chunk_length_s, vad)
    return score_hyps(utterances, hyps, normalizer)


class Recognizer:
    """A loaded speechtl model. ``Recognizer.load(dir).transcribe(paths_or_arrays)``.

    A model trained with ``mode=adapter`` holds one base encoder and an adapter and head
    per language: ``Recognizer.load(dir, lang="cs")`` picks one, and
    :meth:`set_language` switches to another without loading the base again."""

    def __init__(self, model: CTCModel, vocab: Vocabulary, normalizer: Normalizer, meta: dict | None = None,
                 device: str | None = None, model_dir: str | os.PathLike | None = None):
        apply_budget()
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        if model.policy.adapters:  # inference only: LoRA updates folded into the base weights
            from ..models import adapters as adapter_lib

            adapter_lib.set_lora_merged(self.model.encoder.model, True)
        self.vocab = vocab
        self.normalizer = normalizer
        self.meta = meta or {}
        self.model_dir = None if model_dir is None else Path(model_dir)  # where other languages are read from
        self._decoders = Decoders(vocab)  # beam decoders (and their LMs) by setting
        # the folder's own decoding (decoding.json: its LM and tuned weights), used unless told otherwise
        self.default_options = DecodeOptions.read(self.model_dir) if self.model_dir is not None else DecodeOptions()

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device: str | None = None, lang: str | None = None) -> "Recognizer":
        """Load a model directory (or a training run's folder); ``lang`` picks the language of
        an adapter model (default: the one trained last)."""
        from ..models.model_dir import read_meta, resolve_model_dir
        from .onnx import OnnxRecognizer, is_onnx_dir

        if is_onnx_dir(model_dir):  # an exported ONNX folder: onnxruntime, no torch model
            return OnnxRecognizer.load(model_dir, device=device, lang=lang)
        model_dir = resolve_model_dir(model_dir)
        if read_meta(model_dir).get("mode") == "seq2seq":  # Whisper's own decoder: its recogniser
            from .seq2seq import Seq2SeqRecognizer

            return Seq2SeqRecognizer.load(model_dir, device=device, lang=lang)
        model, vocab, normalizer, meta = load_model_dir(model_dir, lang=lang, inference=True)
        return cls(model, vocab, normalizer, meta, device, model_dir)

    @property
    def language(self) -> str | None:
        """The language in use (adapter models; None for others)."""
        return self.model.language

    @property
    def languages(self) -> list[str]:
        """The languages this model has adapters for (empty for models without adapters)."""
        return sorted(self.meta.get("languages", {}))

    def set_language(self, lang: str) -> "Recognizer":
        """Use ``lang``'s adapters, head, vocabulary and normaliser (an adapter model's); the
        base encoder stays loaded as it is. A language the model lacks is an error that lists
        those it has. Transcribers made before (:meth:`transcriber`) keep the vocabulary of
        the language they were made for; make new ones."""
        from ..models.model_dir import use_language

        if not self.model.policy.adapters:
            raise ValueError(f"a {self.model.mode}-mode model has one language and no per-language adapters; "
                             "set_language is for models trained with mode=adapter")
        if self.model_dir is None:
            raise ValueError("this recogniser was not loaded from a model directory; use Recognizer.load(dir, lang=...)")
        if lang != self.model.language:
            self.vocab, self.normalizer = use_language(self.model, self.model_dir, lang)
            self.model.eval()
            self._decoders = Decoders(self.vocab)  # the old ones spoke the previous language's vocabulary
        return self

    def decode_options(self, options: DecodeOptions | None = None, lm: str | os.PathLike | None = None,
                       beam_width: int | None = None, alpha: float | None = None, beta: float | None = None,
                       hotwords: Sequence[str] | None = None, hotword_weight: float = 10.0) -> DecodeOptions:
        """The decoding a call gets: ``options`` when given (``DecodeOptions()`` is greedy);
        else the folder's own (:attr:`default_options`, from ``decoding.json``: its LM and
        tuned weights, or greedy) with the keyword arguments laid over it
        (:meth:`DecodeOptions.over`)."""
        if options is not None:
            return options
        return self.default_options.over(lm, beam_width, alpha, beta, hotwords, hotword_weight)

    def decoder(self, lm: str | os.PathLike | None = None, beam_width: int | None = None, alpha: float | None = None,
                beta: float | None = None, hotwords: Sequence[str] | None = None, hotword_weight: float = 10.0,
                options: DecodeOptions | None = None):
        """Greedy decoding unless ``lm``, ``beam_width`` or ``hotwords`` is given (pyctcdecode
        beam search); ``options`` gives them all at once, in place of the others. A beam
        decoder, with its language model, is built once per setting and kept: the LM is read
        from disk once, however many calls use it."""
        return self._decoders.get(self.decode_options(options, lm, beam_width, alpha, beta, hotwords, hotword_weight))

    def transcriber(self, chunk_length_s: float = 30.0, stride_length_s: float | None = None, max_batch_seconds: float | None = None,
                    lm: str | os.PathLike | None = None, beam_width: int | None = None, alpha: float | None = None, beta: float | None = None,
                    hotwords: Sequence[str] | None = None, hotword_weight: float = 10.0, streams: int | None = None,
                    options: DecodeOptions | None = None, vad="default"):
        """A :class:`speechtl.inference.transcribe.Transcriber` for this model, decoding as :meth:`decoder` says.
        ``streams``: on a CPU, batches of short files run at once, each on one thread
        (default: one per torch thread, at most 8; 1 = one batch at a time on all threads).
        ``vad``: how files longer than ``chunk_length_s`` are cut at pauses (a
        :class:`speechtl.inference.vad.VadOptions`; the default ones unless given; None:
        fixed overlapping windows instead)."""
        from .transcribe import Transcriber
        from .vad import resolve

        vad = resolve(vad)
        decoder = self.decoder(options=self.decode_options(options, lm, beam_width, alpha, beta, hotwords, hotword_weight))
        return Transcriber(self.model, self.vocab, self.device, decoder, chunk_length_s, stride_length_s, max_batch_seconds,
                           streams=streams, vad=vad)

    def transcribe(
        self,
        inputs: str | os.PathLike | np.ndarray | Iterable[str | os.PathLike | np.ndarray],
        max_batch_seconds: float | None = None,
        progress: bool = False,
        chunk_length_s: float = 30.0,
        stride_length_s: float | None = None,
        lm: str | os.PathLike | None = None,
        beam_width: int | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        hotwords: Sequence[str] | None = None,
        hotword_weight: float = 10.0,
        return_timestamps: bool = False,
        options: DecodeOptions | None = None,
        vad="default",
    ):
        """Transcribe files (any format the audio layer reads), folders, ``.jsonl``
        manifests or 16 kHz mono float arrays.

        Audio longer than ``chunk_length_s`` is cut at pauses by voice activity detection
        (``vad``, a :class:`speechtl.inference.vad.VadOptions`; stretches without speech are
        skipped), or with ``vad=None`` decoded in overlapping windows (strides of
        ``stride_length_s`` each side, default a sixth of the window). A single input gives
        a string (or a :class:`speechtl.inference.transcribe.Transcript` with ``return_timestamps``);
        several give a list in input order. A file that cannot be read raises
        :class:`speechtl.AudioError` naming it. ``options`` gives the decoding settings at once,
        in place of ``lm`` .. ``hotword_weight``.
        """
        from .transcribe import transcribe_inputs

        options = self.decode_options(options, lm, beam_width, alpha, beta, hotwords, hotword_weight)
        tr = self.transcriber(chunk_length_s, stride_length_s, max_batch_seconds, options=options, vad=vad)
        return transcribe_inputs(tr, inputs, progress, return_timestamps)

    def evaluate(self, utterances: Sequence[Utterance], out_dir: str | os.PathLike | None = None, progress: bool = False,
                 on_bad_audio: str = "error", lm: str | os.PathLike | None = None, beam_width: int | None = None,
                 alpha: float | None = None, beta: float | None = None, chunk_length_s: float = 30.0,
                 max_batch_seconds: float | None = None, options: DecodeOptions | None = None, vad="default") -> dict:
        """Score on a manifest; with ``out_dir`` write hyps.jsonl, errs.txt, summary.json.

        Greedy decoding, or beam search (with an n-gram ``lm`` when given) as
        :meth:`transcriber` does; recordings longer than ``chunk_length_s`` are cut at pauses
        (``vad``, as :meth:`transcribe`) or, with ``vad=None``, decoded in windows. Every file's header is read first. An unreadable or missing file is an
        error that names all of them (``on_bad_audio="error"``), or is left out of the
        score and listed under ``skipped`` in the summary (``"skip"``). ``options`` gives the
        decoding settings at once, in place of ``lm``, ``beam_width``, ``alpha`` and ``beta``.
        """
        from ..data.audio import check_readable
        from .transcribe import hyps_by_id
        from .vad import resolve

        good, skipped = check_readable(utterances, on_bad_audio, " (--on-bad-audio skip leaves them out)")
        options = self.decode_options(options, lm, beam_width, alpha, beta)
        vad = resolve(vad)
        if options.greedy:  # batched from audio, long recordings in windows
            report = decode_utterances(self.model, self.vocab, self.normalizer, good, self.device, max_batch_seconds,
                                       progress=progress, chunk_length_s=chunk_length_s, vad=vad)
        else:
            tr = self.transcriber(chunk_length_s, None, max_batch_seconds, options=options, vad=vad)
            report = score_hyps(good, hyps_by_id(tr, good, progress), self.normalizer)
        extra = {**options.summary(), **({"skipped": skipped} if skipped else {})}
        if out_dir is not None:
            return write_results(report, Path(out_dir), extra)
        return {**report.summary(), **(extra or {})}

    def tune_lm(self, utterances: Sequence[Utterance], lm: str | os.PathLike, alphas: Sequence[float],
                betas: Sequence[float], beam_width: int = 32, progress: bool = False) -> dict:
        """Grid-search the LM weight ``alpha`` and word bonus ``beta`` on a dev set.

        The model runs once per clip; each pair then re-decodes the kept log-probabilities
        with the same beam decoder (its LM read once). Returns ``{"best": {alpha, beta, wer,
        cer}, "grid": [...], "greedy": {wer, cer}}``; ties keep the first pair in grid order."""
        from ..data.audio import check_readable
        from ..decoding.decoders import BeamDecoder, GreedyDecoder
        from .transcribe import Item, Transcriber

        good, _ = check_readable(utterances, "error")
        kept: dict[str, np.ndarray] = {}
        greedy = GreedyDecoder(self.vocab)

        def keep(log_probs, frame_s):
            kept["last"] = log_probs
            return greedy(log_probs, frame_s)

        tr = Transcriber(self.model, self.vocab, self.device, decoder=keep)  # greedy, keeping what it decodes
        items = [Item(u.id, u.audio) for u in good]
        log_probs, greedy_hyps = {}, {}
        for i, t in tr.run_indexed(items, progress=progress):
            if t.error is not None:
                raise AudioError(t.path, t.error)
            log_probs[items[i].key], greedy_hyps[items[i].key] = kept["last"], t.text
        base = score_hyps(good, greedy_hyps, self.normalizer)
        beam = BeamDecoder(self.vocab, lm, alphas[0], betas[0], beam_width)
        grid = []
        pairs = [(a, b) for a in alphas for b in betas]
        for a, b in tqdm(pairs, desc="lm tune", disable=not progress):
            beam.decoder.reset_params(alpha=a, beta=b)
            hyps = {k: " ".join(w.word for w in beam(lp, tr.frame_s)) for k, lp in log_probs.items()}
            r = score_hyps(good, hyps, self.normalizer)
            grid.append({"alpha": a, "beta": b, "wer": r.wer, "cer": r.cer})
        best = min(grid, key=lambda g: (g["wer"], g["cer"]))
        return {"best": best, "grid": grid, "greedy": {"wer": base.wer, "cer": base.cer}, "utterances": len(good),
                "lm": str(lm), "beam_width": beam_width}
