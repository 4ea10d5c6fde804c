"""The training data: manifests read and checked, the vocabulary chosen, and the clips CTC
cannot train on dropped (with the speed-perturbed copies added)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from ..core import distributed as dist_util
from ..core.distributed import DistContext
from ..data.audio import check_readable
from ..data.loader import speed_copies
from ..data.manifest import Utterance, read_manifest
from ..data.text import Normalizer, NormalizerConfig, Vocabulary, describe_oov
from ..data.units import SubwordVocabulary, describe_units, parse_units
from .config import TrainConfig

logger = logging.getLogger(__name__)

MIN_CARVE = 40  # labelled clips from which a CTC run without dev= holds some out as its dev set


@dataclass(frozen=True)
class TrainData:
    """The training and dev sets after checks, filtering and speed perturbation."""

    normalizer: Normalizer
    vocab: Vocabulary | SubwordVocabulary | None  # chosen once the checkpoint is read (:func:`choose_vocab`)
    train: list[Utterance]
    dev: list[Utterance]
    bad_train: list[dict]
    bad_dev: list[dict]
    originals: int = 0  # training clips kept, before speed-perturbed copies
    dropped: dict = field(default_factory=dict)
    dropped_ids: dict = field(default_factory=dict)
    dropped_copies: int = 0


def read_data(cfg: TrainConfig) -> TrainData:
    """Manifests (every unreadable or missing file reported at once) and the normaliser."""
    normalizer = Normalizer(NormalizerConfig(**cfg.normalizer))
    hint = "; fix them, or train with on_bad_audio=skip, or re-run `speechtl prepare --on-bad-audio skip`"
    train_utts, bad_train = check_readable(read_manifest(cfg.train, check_files=False), cfg.on_bad_audio, hint)
    dev_utts, bad_dev = check_readable(read_manifest(cfg.dev, check_files=False), cfg.on_bad_audio, hint) if cfg.dev else ([], [])
    if cfg.dev and not dev_utts:
        logger.warning("%s: the dev manifest holds no %sutterances: nothing is scored, and the model kept is the last "
                       "one, not the best", cfg.dev, "readable " if bad_dev else "")
    if cfg.lm not in ("auto", "none", None) and not Path(cfg.lm).is_file():
        raise FileNotFoundError(f"config key 'lm': {cfg.lm}: no such file")
    if cfg.lm == "auto" and cfg.lm_wordlist:
        from ..decoding.lm import wordlist_code

        try:
            wordlist_code(cfg.lm_wordlist)
        except ValueError as e:
            raise ValueError(f"config key 'lm_wordlist': {e}") from None
    if not cfg.dev and cfg.dev_fraction > 0 and len(train_utts) >= MIN_CARVE:
        train_utts, dev_utts = carve_dev(train_utts, cfg.dev_fraction, cfg.seed)
        logger.info("no dev set: %d of the %d labelled clips are held out as one (dev_fraction=%g; dev_fraction=0 "
                    "trains on all)", len(dev_utts), len(train_utts) + len(dev_utts), cfg.dev_fraction)
    return TrainData(normalizer, None, train_utts, dev_utts, bad_train, bad_dev)


def carve_dev(utts: list[Utterance], fraction: float, seed: int) -> tuple[list[Utterance], list[Utterance]]:
    """Hold out ``fraction`` of the labelled clips (at least 4, at most 100) as a dev set,
    drawn with ``seed``; returns (train, dev). Clips with the same text stay on one side, so
    that the dev set does not score sentences the model was trained on."""
    n = min(100, max(4, round(len(utts) * fraction)))
    if len(utts) < 2 * n:
        raise ValueError(f"no dev set was given and {len(utts)} labelled clip(s) are too few to hold out {n} for one; "
                         "pass dev=DEV.jsonl")
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(utts):
        groups.setdefault(" ".join(u.text.lower().split()), []).append(i)
    keys = sorted(groups)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    dev_ids: set[int] = set()
    for k in order:
        if len(dev_ids) >= n:
            break
        dev_ids.update(groups[keys[k]])
    return [u for i, u in enumerate(utts) if i not in dev_ids], [u for i, u in enumerate(utts) if i in dev_ids]


def choose_vocab(cfg: TrainConfig, data: TrainData, ck: dict | None, ckpt_path: Path | None = None,
                  ctx: DistContext = DistContext()) -> Vocabulary | SubwordVocabulary:
    """The vocabulary file, else the checkpoint's, else one built from the training text:
    its characters, or (``units=bpe:N``/``unigram:N``) a subword tokenizer trained on it
    (on rank 0, and sent to the other ranks)."""
    train_texts = [data.normalizer(u.text) for u in data.train]
    subword = parse_units(cfg.units)[0] != "char"
    if cfg.vocab:
        vocab = Vocabulary.load(cfg.vocab)
    elif ck is not None:
        written = ck.get("units", "char")
        if parse_units(written) != parse_units(cfg.units):
            raise ValueError(f"{ckpt_path}: written with {describe_units(written)} units ({written}), and this run has "
                             f"units={cfg.units}; resume with the same units, or start afresh without resume=true")
        vocab = SubwordVocabulary.from_str(ck["tokenizer"], written) if subword else Vocabulary(ck["vocab"])
    elif subword:
        trained: tuple = ("", "")
        if ctx.is_main:
            try:
                trained = (SubwordVocabulary.train(train_texts, cfg.units).to_str(), "")
            except ValueError as e:  # told to every rank, so that none waits for the others
                trained = ("", str(e))
        tokenizer, error = dist_util.broadcast_object(trained, ctx)
        if error:
            raise ValueError(error)
        vocab = SubwordVocabulary.from_str(tokenizer, cfg.units)
        logger.info("units=%s: a tokenizer of %d units trained on the %d training transcripts", cfg.units, len(vocab),
                    len(train_texts))
    else:
        vocab = Vocabulary.build(train_texts)
    for name, texts in (("train", train_texts), ("dev", [data.normalizer(u.text) for u in data.dev])):
        oov = vocab.oov_report(texts)
        if oov:
            logger.warning("%s set: %s (mapped to [UNK])", name, describe_oov(oov))
    return vocab


def min_ctc_frames(ids: list[int]) -> int:
    """Frames CTC needs for a target: one per token plus a blank between repeats."""
    return len(ids) + sum(1 for a, b in zip(ids, ids[1:]) if a == b)


def filter_trainable(utts: list[Utterance], texts: list[str], vocab: Vocabulary, frames_for: Callable[[int], int],
                     max_duration: float | None = None) -> tuple[list[Utterance], dict[str, list[str]]]:
    """Drop clips CTC cannot train on (empty transcripts, transcripts longer than the clip's
    frames) and clips over ``max_duration`` seconds; returns the kept clips and the
    dropped ids by reason."""
    keep: list[Utterance] = []
    dropped: dict[str, list[str]] = {"empty_transcript": [], "too_short_for_transcript": [], "too_long": []}
    for u, t in zip(utts, texts):
        if not t:
            dropped["empty_transcript"].append(u.id)
        elif max_duration is not None and u.duration > max_duration:
            dropped["too_long"].append(u.id)
        elif min_ctc_frames(vocab.encode(t)) > frames_for(int(u.duration * 16_000)):
            dropped["too_short_for_transcript"].append(u.id)
        else:
            keep.append(u)
    vocab.oov.clear()
    return keep, dropped


def filter_data(cfg: TrainConfig, data: TrainData, frames_for: Callable[[int], int], span: float, ck: dict | None,
                ckpt_path: Path) -> TrainData:
    """Drop what CTC cannot train on (and clips over ``max_duration`` or the encoder's span),
    then add the speed-perturbed copies, filtered in their turn. ``frames_for(samples)``
    is the model's frame count for a clip of that many samples."""
    max_duration = cfg.max_duration
    # an encoder with a fixed span (Whisper: 30 s) cannot take longer clips; they are dropped and counted like others
    if span < (max_duration if max_duration is not None else float("inf")):
        logger.info("max_duration %s s: this encoder takes clips of at most %g s", cfg.max_duration, span)
        max_duration = span
    # a clip longer than a micro-batch's cap would be a batch of its own, of any size: one hour of audio
    # (max_duration=none) needs tens of GB in a real encoder
    if cfg.max_batch_seconds < (max_duration if max_duration is not None else float("inf")):
        logger.info("max_duration %s s: clips longer than max_batch_seconds=%g s are dropped too", cfg.max_duration,
                    cfg.max_batch_seconds)
        max_duration = cfg.max_batch_seconds
    texts = [data.normalizer(u.text) for u in data.train]
    train, dropped_ids = filter_trainable(data.train, texts, data.vocab, frames_for, max_duration)
    originals, dropped_copies = len(train), 0
    if cfg.speed_perturb:
        copies = speed_copies(train, cfg.speed_perturb)[originals:]
        kept, gone = filter_trainable(copies, [data.normalizer(u.text) for u in copies], data.vocab, frames_for, max_duration)
        dropped_copies = sum(len(v) for v in gone.values())
        train = train + kept
        logger.info("speed perturbation %s: %d training items (%d copies dropped: too short for their transcript "
                    "or too long)", ", ".join(f"{f:g}" for f in cfg.speed_perturb), len(train), dropped_copies)
    if ck is not None and ck["state"].get("train_items", len(train)) != len(train):
        raise ValueError(f"{ckpt_path}: written for {ck['state']['train_items']} training items, this run has "
                         f"{len(train)} (the manifest, its filtering or speed_perturb changed); the batches would "
                         "not continue where they stopped, so resume with the same data, or start afresh")
    dropped = {k: len(v) for k, v in dropped_ids.items()}
    if any(dropped.values()):
        logger.warning("dropped from training: %d with empty transcript, %d too short for their transcript under CTC, "
                       "%d longer than max_duration=%s s (or max_batch_seconds=%g)", dropped["empty_transcript"],
                       dropped["too_short_for_transcript"], dropped["too_long"], cfg.max_duration, cfg.max_batch_seconds)
    if not train:
        raise ValueError(f"{cfg.train}: no trainable utterances left after filtering ({dropped})")
    return replace(data, train=train, originals=originals, dropped=dropped, dropped_ids=dropped_ids,
                   dropped_copies=dropped_copies)
