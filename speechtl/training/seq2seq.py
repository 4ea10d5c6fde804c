"""Training ``mode=seq2seq``: Whisper's encoder-decoder fine-tuned on the labelled set.

``seq2seq_train`` chooses what learns:

- ``decoder`` (default): the encoder stays fixed and runs once per clip (its outputs are
  kept in memory as float16); the decoder, embeddings included, trains at ``encoder_lr``.
  The cheapest of the three, and the one that keeps the encoder's knowledge of real
  recordings while the decoder learns the language's words and spelling.
- ``lora``: LoRA updates (peft) on every attention and feed-forward projection of both
  halves, at ``lr``; the base stays fixed and a language costs a few MB of disk.
- ``lora_decoder``: LoRA on the decoder's projections only, at ``lr``; the encoder stays
  fixed and runs once per clip, as with ``decoder``, so an update costs what a decoder
  update costs and a language still costs a few MB.
- ``full``: everything but the convolutional front end trains, at ``encoder_lr``.

Where the encoder trains (``lora``, ``full``), the dev set is encoded again with the current
weights at every evaluation; where it is fixed, every clip's encoder output is kept.

Targets are Whisper's: start of transcript, language, transcribe, no timestamps, the
text as the manifest writes it, end of text; the forced prefix is not scored. When no
dev set is given, one is carved from the labelled set (``dev_fraction``) for selecting
the best update and early stopping; the unadapted model is scored on it first and is kept
when no update beats it (small labelled sets can teach the decoder to write training
sentences over unseen speech). Checkpoints hold the trainable weights, optimiser,
schedule position and random state, loaded with ``weights_only=True``. With
``average_last=K``, the trainable weights at each of the last K evaluations are kept in
``out/checkpoints/eval-*.safetensors``; their mean is scored on dev and written to
``out/model_avg`` (``train_summary.json``'s ``average``). With ``seq2seq_ctc``, a CTC
head learns beside the decoder from the same batches (:mod:`speechtl.models.seq2seq_ctc`);
its state goes with the decoder's in checkpoints, snapshots and the kept best, and its
weight in hybrid decoding is chosen on dev at the end (``train_summary.json``'s ``ctc``).
With ``continue_steps`` (and ``unlabelled``), the encoder first continues self-supervised
training on the target's audio (:mod:`speechtl.training.seq2seq_continue`), after the
unadapted model has been scored on dev (``train_summary.json``'s ``continued``).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.io import atomic_path, write_json
from ..data.audio import SAMPLE_RATE, check_readable, load_audio
from ..data.manifest import Utterance, read_manifest
from ..data.text import Normalizer, NormalizerConfig, Vocabulary
from ..decoding.metrics import UtteranceResult, score
from ..models import seq2seq as s2s
from ..models.average import mean_of_snapshots, write_snapshot
from ..models.seq2seq_ctc import WEIGHTS, Companion, candidates, frame_lengths
from .config import TrainConfig
from .data import carve_dev

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.pt"
_clock = time.monotonic  # pseudo-labelling's time budget (a test replaces it)
ENCODER_FIXED = ("decoder", "lora_decoder")  # seq2seq_train values that leave the encoder as it is
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class _Set:
    utts: list[Utterance]
    targets: list[list[int]]
    samples: list[int] | None = None  # clip lengths, in samples
    hidden: list[torch.Tensor] | None = None  # fixed encoder outputs (decoder mode), float16


def _read_sets(cfg: TrainConfig) -> tuple[list[Utterance], list[Utterance], bool]:
    train = read_manifest(cfg.train)
    train, _ = check_readable(train, cfg.on_bad_audio, " (on_bad_audio=skip leaves them out)")
    long = [u.id for u in train if u.duration > s2s.WINDOW_S]
    if long:
        logger.warning("%d training clip(s) longer than Whisper's 30 s window left out (first: %s)", len(long), long[0])
        train = [u for u in train if u.duration <= s2s.WINDOW_S]
    if cfg.dev:
        dev = read_manifest(cfg.dev)
        dev, _ = check_readable(dev, cfg.on_bad_audio, " (on_bad_audio=skip leaves them out)")
        return train, [u for u in dev if u.duration <= s2s.WINDOW_S], False
    train, dev = carve_dev(train, cfg.dev_fraction, cfg.seed)
    return train, dev, True


def _targets(tokenizer, utts: list[Utterance], prefix: list[int], limit: int) -> list[list[int]]:
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    out = []
    for u in utts:
        ids = prefix + tokenizer.encode(" " + u.text.strip(), add_special_tokens=False) + [eot]
        if len(ids) > limit:
            raise ValueError(f"{u.id}: its transcript is {len(ids)} tokens, more than Whisper's {limit}")
        out.append(ids)
    return out


def _set_trainable(model, part: str, cfg: TrainConfig):
    """Freeze per ``part``; returns the model to train (a peft wrapper for lora) and the
    parameter groups of its optimiser."""
    for p in model.parameters():
        p.requires_grad_(False)
    if part in ("lora", "lora_decoder"):
        from peft import LoraConfig, get_peft_model

        rank = cfg.lora_rank or 8
        # lora_decoder: a full-match pattern over module names, the decoder's layers only
        targets = LORA_MODULES if part == "lora" else rf".*decoder\.layers\.\d+\..*({'|'.join(LORA_MODULES)})"
        lcfg = LoraConfig(r=rank, lora_alpha=cfg.lora_alpha or 2 * rank, lora_dropout=0.05, target_modules=targets)
        model = get_peft_model(model, lcfg)
        return model, [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    halves = [model.model.decoder] + ([model.model.encoder] if part == "full" else [])
    for half in halves:
        for p in half.parameters():
            p.requires_grad_(True)
    if part == "full":
        for conv in (model.model.encoder.conv1, model.model.encoder.conv2):
            for p in conv.parameters():
                p.requires_grad_(False)
    model.model.decoder.embed_positions.weight.requires_grad_(False)
    return model, [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.encoder_lr}]


def _encode_all(model, processor, data: _Set, device, progress: bool, keep: bool) -> None:
    """Clip lengths of ``data``, and with ``keep`` its fixed encoder outputs (float16)."""
    from tqdm.auto import tqdm

    data.samples, hidden = [], []
    for k in tqdm(range(0, len(data.utts), 8), desc="encode", disable=not progress, leave=False):
        wavs = [load_audio(u.audio) for u in data.utts[k:k + 8]]
        data.samples += [len(w) for w in wavs]
        if keep:
            hidden += [h.to(torch.float16).cpu() for h in s2s.encode(model, processor, wavs, device)]
    data.hidden = hidden if keep else None


def _batches(utts: list[Utterance], max_seconds: float, gen: torch.Generator) -> list[list[int]]:
    """One epoch of batches: shuffled, then cut where the padded seconds would pass ``max_seconds``."""
    order = torch.randperm(len(utts), generator=gen).tolist()
    batches, cur, longest = [], [], 0.0
    for i in order:
        d = max(longest, utts[i].duration)
        if cur and d * (len(cur) + 1) > max_seconds:
            batches.append(cur)
            cur, d = [], utts[i].duration
        cur.append(i)
        longest = d
    return batches + ([cur] if cur else [])


def _loss(model, part: str, processor, data: _Set, idx: list[int], prefix_len: int, device,
          ctc: tuple[Companion, Normalizer] | None = None, window: str = "30") -> torch.Tensor:
    from transformers.modeling_outputs import BaseModelOutput

    if data.hidden is not None:
        hidden = [data.hidden[i].to(device, torch.float32) for i in idx]
    else:
        hidden = s2s.encode(model, processor, [load_audio(data.utts[i].audio) for i in idx], device,
                            grad=part not in ENCODER_FIXED, window=window)
    states = s2s.stack_hidden(hidden, [data.samples[i] for i in idx])
    seqs = [data.targets[i] for i in idx]
    t = max(len(s) for s in seqs) - 1
    inp = torch.full((len(seqs), t), seqs[0][-1], dtype=torch.long)
    labels = torch.full((len(seqs), t), -100, dtype=torch.long)
    for k, s in enumerate(seqs):
        inp[k, : len(s) - 1] = torch.tensor(s[:-1])
        labels[k, prefix_len - 1: len(s) - 1] = torch.tensor(s[prefix_len:])  # the forced prefix is not scored
    out = model(encoder_outputs=BaseModelOutput(last_hidden_state=states), decoder_input_ids=inp.to(device))
    logits = out.logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.to(device).reshape(-1),
                                             ignore_index=-100)
    if ctc is not None:  # the companion head, on the same encoder outputs (its own parameters)
        comp, normalizer = ctc
        lengths = frame_lengths([data.samples[i] for i in idx], states.shape[1])
        loss = loss + comp.loss(states, lengths, comp.targets(normalizer, [data.utts[i].text for i in idx]))
    return loss


def _dev_hidden(run: _Run, idx) -> list[torch.Tensor]:
    """Encoder outputs of dev clips ``idx``: the kept ones where the encoder is fixed, else
    encoded again with the current weights."""
    if run.part in ENCODER_FIXED:
        return [run.dev.hidden[i].to(run.device, torch.float32) for i in idx]
    with torch.inference_mode():
        return s2s.encode(run.model, run.processor, [load_audio(run.dev.utts[i].audio) for i in idx], run.device,
                          window=run.cfg.seq2seq_window)


def _score_dev(run: _Run, num_beams: int = 1) -> dict:
    model, dev = run.model, run.dev
    was = model.training
    model.eval()
    hyps = []
    for k in range(0, len(dev.utts), 8):
        idx = range(k, min(k + 8, len(dev.utts)))
        hyps += s2s.generate(model, run.processor.tokenizer, _dev_hidden(run, idx), [dev.samples[i] for i in idx],
                             run.lang, num_beams)
    model.train(was)
    report = score([UtteranceResult(u.id, u.text, h, u.duration) for u, h in zip(dev.utts, hyps)],
                   normalize=run.normalizer)
    return {"wer": report.wer, "cer": report.cer,
            "looping": sum(s2s.looping(r.hyp) for r in report.results)}


CTC_PREFIX = "ctc_head."  # the companion head's entries in a trainable state


def _ctc_dev_cer(run: _Run) -> float:
    """Dev CER of the CTC head alone (greedy)."""
    was = run.ctc.head.training
    run.ctc.head.eval()
    hyps = []
    for k in range(0, len(run.dev.utts), 16):
        idx = range(k, min(k + 16, len(run.dev.utts)))
        samples = [run.dev.samples[i] for i in idx]
        states = s2s.stack_hidden(_dev_hidden(run, idx), samples)
        hyps += run.ctc.transcribe(states, samples)[2]
    run.ctc.head.train(was)
    return score([UtteranceResult(u.id, u.text, h, u.duration) for u, h in zip(run.dev.utts, hyps)],
                 normalize=run.normalizer).cer


def _track_ctc_best(run: _Run, step: int) -> None:
    cer = _ctc_dev_cer(run)
    logger.info("update %d: the CTC head alone reads dev CER %.4f", step, cer)
    if run.ctc_best is None or cer < run.ctc_best["cer"]:
        run.ctc_best = {"step": step, "cer": cer,
                        "state": {k: v.detach().cpu().clone() for k, v in run.ctc.head.state_dict().items()}}


def _choose_beams(run: _Run) -> dict:
    """Greedy or ``seq2seq_beam_width`` beams, whichever reads the lower dev CER with the
    current weights, and what each read. Ties go to the beams: a small dev set often ties,
    and beam search is the decoder's usual decoding (Whisper's own defaults to 5 beams)."""
    width = run.cfg.seq2seq_beam_width
    if width <= 1:
        return {"beam_width": 1}
    greedy, beam = _score_dev(run)["cer"], _score_dev(run, width)["cer"]
    chosen = width if beam <= greedy else 1
    logger.info("decoding: %s on dev (CER greedy %.4f, %d beams %.4f)", "greedy" if chosen == 1 else f"{width} beams",
                greedy, width, beam)
    return {"beam_width": chosen, "dev_cer_greedy": round(greedy, 5), "dev_cer_beams": round(beam, 5), "tried": width}


def _choose_ctc_weight(run: _Run, num_beams: int = 1) -> dict:
    """The CTC weight of hybrid decoding that reads the lowest dev CER with the current
    weights, the decoder's candidate from ``num_beams`` beams (ties go to the decoder alone,
    then to the smaller weight), and what each read."""
    from ..models.seq2seq_ctc import Candidates

    was = run.model.training, run.ctc.head.training
    run.model.eval()
    run.ctc.head.eval()
    parts = []
    for k in range(0, len(run.dev.utts), 8):
        idx = range(k, min(k + 8, len(run.dev.utts)))
        hidden = _dev_hidden(run, idx)
        samples = [run.dev.samples[i] for i in idx]
        att = [[t for t, _ in n] for n in s2s.generate(run.model, run.processor.tokenizer, hidden, samples, run.lang,
                                                        num_beams, with_confidence=True, nbest=True)]
        parts.append(candidates(run.model, run.processor.tokenizer, run.ctc, run.normalizer,
                                s2s.stack_hidden(hidden, samples), samples, run.prefix, att))
    all_c = Candidates.join(parts)
    run.model.train(was[0])
    run.ctc.head.train(was[1])

    def cer(texts: list[str]) -> float:
        return score([UtteranceResult(u.id, u.text, h, u.duration) for u, h in zip(run.dev.utts, texts)],
                     normalize=run.normalizer).cer

    tried = {}
    for w in (None, *WEIGHTS):
        picks = all_c.pick(w)
        tried["off" if w is None else str(w)] = {"dev_cer": round(cer([t for t, _ in picks]), 5),
                                                 "ctc_chosen": sum(c for _, c in picks)}
    best = min(tried, key=lambda k: tried[k]["dev_cer"])  # dicts keep order: off first, then rising weights
    out = {"weight": None if best == "off" else float(best), "dev_cer_ctc_alone": round(cer(all_c.ctc), 5),
           "tried": tried, **({"head_step": run.ctc_best["step"]} if run.ctc_best else {})}
    logger.info("hybrid CTC/attention decoding: weight %s on dev (CER %.4f; the decoder alone %.4f, the CTC head "
                "alone %.4f)", best, tried[best]["dev_cer"], tried["off"]["dev_cer"], out["dev_cer_ctc_alone"])
    return out


def _trainable_state(model, comp: Companion | None = None) -> dict:
    state = {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad}
    if comp is not None:
        state |= {CTC_PREFIX + k: v.detach().cpu().clone() for k, v in comp.head.state_dict().items()}
    return state


def _load_trainable(model, state: dict, comp: Companion | None = None) -> None:
    params = dict(model.named_parameters())
    head = {k[len(CTC_PREFIX):]: v for k, v in state.items() if k.startswith(CTC_PREFIX)}
    with torch.no_grad():
        for k, v in state.items():
            if not k.startswith(CTC_PREFIX):
                params[k].copy_(v)
    if comp is not None and head:
        comp.head.load_state_dict(head)


@dataclass
class _Run:
    """What one seq2seq training run holds; built once by :func:`_build`."""

    cfg: TrainConfig
    out: Path
    model: object
    processor: object
    lang: str | None
    prefix: list[int]
    part: str
    train: _Set
    dev: _Set
    unlabelled: list[Utterance]
    normalizer: Normalizer
    device: torch.device
    opt: torch.optim.Optimizer
    sched: object
    gen: torch.Generator
    params: list
    carved: bool
    source: str
    unlabelled_hidden: dict | None = None
    events: object | None = None  # TensorBoard's writer, with log=tensorboard
    ctc: Companion | None = None  # with seq2seq_ctc
    ctc_best: dict | None = None  # decoder mode: the head's own best on dev, {"step", "cer", "state"}

    def state(self) -> dict:
        return _trainable_state(self.model, self.ctc)

    def load(self, state: dict) -> None:
        """Load a trainable state. In decoder mode the encoder is fixed, so the CTC head is
        independent of the decoder: it keeps its own best weights on dev."""
        _load_trainable(self.model, state, self.ctc)
        if self.ctc_best is not None:
            self.ctc.head.load_state_dict(self.ctc_best["state"])


def _build(cfg: TrainConfig, progress: bool) -> _Run:
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from ..core.distributed import pick_device
    from .lr import Horizon, lr_lambda
    from .train import write_config_yaml

    source = s2s.whisper_source(cfg.encoder)  # before any work: a Whisper with a decoder
    processor = WhisperProcessor.from_pretrained(source)
    train_utts, dev_utts, carved = _read_sets(cfg)
    unlabelled = _read_unlabelled(cfg) if cfg.unlabelled else []
    lang = s2s.language_token(processor.tokenizer, cfg.lang or (train_utts[0].lang if train_utts else None))
    prefix = s2s.prefix_ids(processor.tokenizer, lang)
    model = WhisperForConditionalGeneration.from_pretrained(source, use_safetensors=True)
    train = _Set(train_utts, _targets(processor.tokenizer, train_utts, prefix, model.config.max_target_positions))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_config_yaml(cfg, out / "config.yaml")
    device = pick_device(None if cfg.device == "auto" else cfg.device)
    model.to(device).eval()
    torch.manual_seed(cfg.seed)
    dev = _Set(dev_utts, [])
    _encode_all(model, processor, dev, device, progress, keep=cfg.seq2seq_train in ENCODER_FIXED)
    _encode_all(model, processor, train, device, progress, keep=cfg.seq2seq_train in ENCODER_FIXED)
    model, groups = _set_trainable(model, cfg.seq2seq_train, cfg)
    comp = None
    if cfg.seq2seq_ctc:
        normalizer = Normalizer(NormalizerConfig(**cfg.normalizer))
        vocab = Vocabulary.build(normalizer(u.text) for u in train_utts)
        width = model.config.d_model
        comp = Companion.build(width, vocab, cfg.bilstm_hidden, cfg.bilstm_layers)
        comp.head.to(device).train()
        groups.append({"params": list(comp.head.parameters()), "lr": cfg.seq2seq_ctc_lr or cfg.lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    rounds = 1 + (cfg.self_train_rounds if unlabelled else 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, Horizon(cfg.max_steps * rounds)))
    return _Run(cfg, out, model, processor, lang, prefix, cfg.seq2seq_train, train, dev, unlabelled,
                Normalizer(NormalizerConfig(**cfg.normalizer)), device, opt, sched,
                torch.Generator().manual_seed(cfg.seed), [p for g in groups for p in g["params"]], carved, source,
                ctc=comp)


def _read_unlabelled(cfg: TrainConfig) -> list[Utterance]:
    utts = read_manifest(cfg.unlabelled, unlabelled=True)
    utts, _ = check_readable(utts, cfg.on_bad_audio, " (on_bad_audio=skip leaves them out)")
    long = [u for u in utts if u.duration > s2s.WINDOW_S]
    if long:
        raise ValueError(f"config key 'unlabelled': {len(long)} clip(s) are longer than Whisper's 30 s window (first: "
                         f"{long[0].id}, {long[0].duration:.1f} s); cut them first (speechtl transcribe handles long "
                         "files, self-training takes clips)")
    return utts


def _pseudo_label(run: _Run, progress: bool, round_: int = 1) -> list[list]:
    """[id, text, confidence] for the unlabelled clips, from the current weights. The clips
    are taken in a random order (``seed`` and the round), in groups of 64 sorted by length
    so that each batch of 8 pads little; with ``pseudo_label_max_minutes`` labelling stops
    when that time has passed, leaving a random part of them. In decoder mode the encoder
    outputs are kept (``run.unlabelled_hidden``) for training on them."""
    from tqdm.auto import tqdm

    run.model.eval()
    out = []
    keep = run.train.hidden is not None
    run.unlabelled_hidden = {}
    order = torch.randperm(len(run.unlabelled), generator=torch.Generator().manual_seed(run.cfg.seed + round_)).tolist()
    order = [i for k in range(0, len(order), 64) for i in sorted(order[k:k + 64], key=lambda i: run.unlabelled[i].duration)]
    limit = None if run.cfg.pseudo_label_max_minutes is None else run.cfg.pseudo_label_max_minutes * 60
    start = _clock()
    bar = tqdm(total=len(order), desc="pseudo-label", unit="clip", disable=not progress, leave=False)
    for k in range(0, len(order), 8):
        if limit is not None and (spent := _clock() - start) > limit:
            logger.info("pseudo-labelling stopped after %.1f min (pseudo_label_max_minutes): %d of %d unlabelled "
                        "clips labelled", spent / 60, len(out), len(order))
            break
        utts = [run.unlabelled[i] for i in order[k:k + 8]]
        wavs = [load_audio(u.audio) for u in utts]
        with torch.inference_mode():
            hidden = s2s.encode(run.model, run.processor, wavs, run.device, window=run.cfg.seq2seq_window)
        res = s2s.generate(run.model, run.processor.tokenizer, hidden, [len(w) for w in wavs], run.lang,
                           with_confidence=True)
        out += [[u.id, text, round(conf, 4)] for u, (text, conf) in zip(utts, res)]
        if keep:
            run.unlabelled_hidden.update({u.id: h.to(torch.float16).cpu() for u, h in zip(utts, hidden)})
        bar.update(len(utts))
    bar.close()
    run.model.train()
    return out


def _add_pseudo(run: _Run, labels: list[list], progress: bool) -> int:
    """Add the trusted pseudo-labels to the training set; returns how many."""
    by_id = {u.id: u for u in run.unlabelled}
    keep = [dataclasses.replace(by_id[i], text=text)
            for i, text, conf in labels if text and conf >= run.cfg.pseudo_min_confidence and not s2s.looping(text)]
    limit = run.model.config.max_target_positions if hasattr(run.model, "config") else 448
    # a transcript longer than the decoder's positions is a runaway one: left out, not an error half-way
    pairs = [(u, ids) for u, ids in zip(keep, _targets(run.processor.tokenizer, keep, run.prefix, 10**9))
             if len(ids) <= limit]
    if len(pairs) < len(keep):
        logger.info("self-training: %d pseudo-label(s) longer than the decoder's %d positions left out",
                    len(keep) - len(pairs), limit)
    keep = [u for u, _ in pairs]
    added = _Set(keep, [ids for _, ids in pairs])
    if run.unlabelled_hidden:  # encoded while pseudo-labelling
        added.samples = [int(round(u.duration * SAMPLE_RATE)) for u in keep]
        added.hidden = [run.unlabelled_hidden[u.id] for u in keep]
        run.unlabelled_hidden = {}
    else:
        _encode_all(run.model, run.processor, added, run.device, progress, keep=run.train.hidden is not None)
    run.train.utts += added.utts
    run.train.targets += added.targets
    run.train.samples += added.samples
    if run.train.hidden is not None:
        run.train.hidden += added.hidden
    return len(keep)


def train_seq2seq(cfg: TrainConfig, progress: bool = True, should_stop=None) -> dict:
    """Fine-tune Whisper per ``cfg`` (``mode=seq2seq``); returns the training summary, also
    written to ``out/train_summary.json``. ``should_stop(step)`` is called after every update.
    With ``unlabelled``, each self-training round pseudo-labels it with the best weights so
    far and trains ``max_steps`` more updates on labelled and trusted pseudo-labelled clips."""
    from .checkpoint import load_checkpoint

    run = _build(cfg, progress)
    st = {"step": 0, "best": None, "best_step": 0, "evals_since_best": 0, "wall": 0.0, "perm": [], "round": 0,
          "pseudo": [], "pseudo_kept": 0}
    ck_path = run.out / CHECKPOINT
    best_state = None
    if cfg.resume and ck_path.is_file():
        ck = load_checkpoint(ck_path)
        run.load(ck["trainable"])
        run.opt.load_state_dict(ck["optimizer"])
        run.sched.load_state_dict(ck["scheduler"])
        run.gen.set_state(ck["generator"])
        st, best_state = ck["state"], ck.get("best_state")
        run.ctc_best = ck.get("ctc_best") if run.ctc is not None else None
        if st["pseudo"]:
            _add_pseudo(run, st["pseudo"], progress)
        logger.info("resumed from %s at update %d", ck_path, st["step"])
    else:
        (run.out / "metrics.csv").unlink(missing_ok=True)
    base = None
    if not st["step"]:  # the unadapted model is the first candidate: an update must beat it on dev to be kept
        base = _score_dev(run)
        st["best"], st["best_step"], best_state = base, 0, run.state()
        if cfg.continue_steps:
            from .seq2seq_continue import continue_encoder

            continued = continue_encoder(run, progress)
            continued["dev_after"] = _score_dev(run)  # the unadapted decoder on the continued encoder
            logger.info("after continued pretraining, before transcripts: dev WER %.4f CER %.4f",
                        continued["dev_after"]["wer"], continued["dev_after"]["cer"])
            st["continued"] = continued
    rounds = 1 + (cfg.self_train_rounds if run.unlabelled else 0)
    stop_reason = None
    while True:
        best_state, stop_reason = _fit(run, st, best_state, cfg.max_steps * (st["round"] + 1), progress, should_stop)
        if st["round"] + 1 >= rounds or stop_reason == "max_minutes":
            break
        if best_state is not None:
            run.load(best_state)
        if st["round"] == 0:  # the model from labelled data alone, for comparison
            st["beams"] = _choose_beams(run)
            if run.ctc is not None:
                st["ctc"] = _choose_ctc_weight(run, st["beams"]["beam_width"])
            _save_model(run, st, run.out / "model_labelled")
        st["round"] += 1
        st["pseudo"] = _pseudo_label(run, progress, st["round"])
        st["pseudo_kept"] = _add_pseudo(run, st["pseudo"], progress)
        st["perm"], st["evals_since_best"] = [], 0
        logger.info("self-training round %d: %d of %d pseudo-labels kept", st["round"], st["pseudo_kept"],
                    len(st["pseudo"]))
    if best_state is not None:
        run.load(best_state)
    if st["best_step"] == 0 and st["best"] is not None:
        logger.warning("no update beat the unadapted model on the dev set (%s %.4f); the model keeps Whisper's own "
                       "weights", cfg.best_metric, st["best"][cfg.best_metric])
    run.model.eval()
    st["beams"] = _choose_beams(run)
    if run.ctc is not None:
        run.ctc.head.eval()
        st["ctc"] = _choose_ctc_weight(run, st["beams"]["beam_width"])
    summary = _finish(run, st, base, stop_reason)
    if cfg.average_last:
        summary["average"] = _average_snapshots(run, st)
        write_json(run.out / "train_summary.json", summary)
    return summary


def _fit(run: _Run, st: dict, best_state, until: int, progress: bool, should_stop):
    """Train until update ``until`` (or patience, or the time budget); returns the best
    trainable state so far and why it stopped early (None when it ran to ``until``)."""
    from tqdm.auto import tqdm

    from .run import TrainingInterrupted

    cfg = run.cfg
    run.model.train()
    start, wall0, losses, stop_reason = time.time(), st["wall"], [], None
    # the CTC head is clipped apart: its early gradients must not shrink the decoder's updates
    head = [] if run.ctc is None else list(run.ctc.head.parameters())
    clip_groups = [[p for p in run.params if all(p is not h for h in head)]] + ([head] if head else [])
    bar = tqdm(total=until, initial=st["step"], desc=f"train (round {st['round'] + 1})", disable=not progress)
    while st["step"] < until:
        if not st["perm"]:
            st["perm"] = _batches(run.train.utts, cfg.max_batch_seconds, run.gen)
        loss = _loss(run.model, run.part, run.processor, run.train, st["perm"].pop(0), len(run.prefix), run.device,
                     None if run.ctc is None else (run.ctc, run.normalizer), cfg.seq2seq_window)
        if not torch.isfinite(loss):
            raise RuntimeError(f"update {st['step'] + 1}: the loss is {loss.item()}; stopped before applying it (the last checkpoint and model are kept); lower encoder_lr/lr")
        loss.backward()
        if cfg.clip_norm > 0:
            for group in clip_groups:
                torch.nn.utils.clip_grad_norm_(group, cfg.clip_norm)
        run.opt.step()
        run.sched.step()
        run.opt.zero_grad(set_to_none=True)
        st["step"] += 1
        losses.append(loss.detach())
        bar.update(1)
        st["wall"] = wall0 + time.time() - start
        row = None
        if st["step"] % cfg.log_every == 0 or st["step"] == until:
            row = {"step": st["step"], "loss": round(float(torch.stack(losses).mean()), 5),
                   "lr": f"{run.sched.get_last_lr()[0]:.3e}", "wall_s": round(st["wall"], 1)}
            losses = []
        out_of_time = cfg.max_minutes is not None and st["wall"] > cfg.max_minutes * 60
        if st["step"] % cfg.eval_every == 0 or st["step"] == until or out_of_time:
            if cfg.average_last:
                write_snapshot(run.out / "checkpoints", st["step"], run.state(), cfg.average_last)
            r = _score_dev(run)
            row = (row or {"step": st["step"]}) | {"dev_wer": round(r["wer"], 5), "dev_cer": round(r["cer"], 5)}
            if run.ctc is not None and run.part in ENCODER_FIXED:
                _track_ctc_best(run, st["step"])
            if st["best"] is None or r[cfg.best_metric] < st["best"][cfg.best_metric]:
                st["best"], st["best_step"], st["evals_since_best"] = r, st["step"], 0
                best_state = run.state()
            else:
                st["evals_since_best"] += 1
            if cfg.patience and st["evals_since_best"] >= cfg.patience:
                stop_reason = "patience"
        if row is not None:
            _append_metrics(run.out / "metrics.csv", row)
            _write_events(run, row)
        asked = should_stop is not None and should_stop(st["step"])
        if st["step"] % (cfg.save_every or cfg.eval_every) == 0 or asked or stop_reason or out_of_time:
            _save_checkpoint(run.out / CHECKPOINT, run, st, best_state)
        if asked:
            raise TrainingInterrupted(f"stopped after update {st['step']}")
        if out_of_time:
            stop_reason = "max_minutes"
        if stop_reason:
            st["step"] = until if stop_reason == "patience" else st["step"]  # the next round starts on schedule
            break
    bar.close()
    return best_state, stop_reason


def _save_model(run: _Run, st: dict, path: Path, steps: list[int] | None = None) -> Path:
    from ..models.seq2seq import save_seq2seq

    meta = {"language": run.lang, "seq2seq_train": run.part, "base_source": run.source, "best_step": st["best_step"],
            "self_train_rounds": st["round"], "encoder": {"source": run.cfg.encoder}, "window": run.cfg.seq2seq_window}
    if run.ctc is not None:
        meta["ctc_weight"] = st["ctc"]["weight"]
    if steps is not None:  # the mean of these updates' weights
        meta |= {"best_step": None, "averaged_steps": steps}
    beams = st.get("beams", {})
    decoding = None  # greedy: no record
    if beams.get("beam_width", 1) > 1:  # the folder's own decoding, chosen on dev
        decoding = {"decoder": "beam", "chosen_on": "dev", **beams}
    return save_seq2seq(run.model, run.processor, run.normalizer, path, meta, run.ctc, decoding)


def _finish(run: _Run, st: dict, base: dict | None, stop_reason: str | None) -> dict:
    model_dir = _save_model(run, st, run.out / "model")
    best = st["best"] or {}
    summary = {"mode": "seq2seq", "seq2seq_train": run.part, "steps": st["step"], "wall_time_s": round(st["wall"], 1),
               "seconds_per_update": round(st["wall"] / max(st["step"], 1), 3), "model_dir": str(model_dir),
               "best_dev_wer": best.get("wer"), "best_dev_cer": best.get("cer"), "best_step": st["best_step"],
               "dev_before": base, "dev_utterances": len(run.dev.utts),
               "dev_carved_from_train": len(run.dev.utts) if run.carved else 0,
               "train_utterances": len(run.train.utts) - st["pseudo_kept"], "self_train_rounds": st["round"],
               "unlabelled_clips": len(run.unlabelled), "pseudo_labelled": len(st["pseudo"]),
               "pseudo_kept": st["pseudo_kept"], "stop_reason": stop_reason,
               "trainable_parameters": sum(p.numel() for p in run.params)}
    summary["beams"] = st["beams"]
    if st.get("continued"):
        summary["continued"] = st["continued"]
    if run.ctc is not None:
        summary["ctc"] = st["ctc"]
    write_json(run.out / "train_summary.json", summary)
    return summary


def _average_snapshots(run: _Run, st: dict) -> dict | None:
    """Score the mean of the kept snapshots on dev and write it to ``out/model_avg``; the
    model is left holding the kept (best) weights, as ``out/model`` has them."""
    found = mean_of_snapshots(run.out / "checkpoints", run.cfg.average_last)
    if found is None:
        return None
    steps, mean = found
    kept = run.state()
    run.load(mean)
    r = _score_dev(run)
    st = st | {"beams": _choose_beams(run)}  # the mean's own decoding, chosen on dev as the kept model's was
    if run.ctc is not None:
        st |= {"ctc": _choose_ctc_weight(run, st["beams"]["beam_width"])}
    path = _save_model(run, st, run.out / "model_avg", steps)
    run.load(kept)
    logger.info("mean of updates %s: dev WER %.4f CER %.4f", steps, r["wer"], r["cer"])
    return {"steps": steps, "model_dir": str(path), "dev_wer": r["wer"], "dev_cer": r["cer"], "looping": r["looping"],
            "beams": st["beams"]}


def _write_events(run: _Run, row: dict) -> None:
    """With ``log=tensorboard``, the row as TensorBoard events beside metrics.csv (on resume,
    events after the checkpoint's update are purged, to be written again)."""
    if "tensorboard" not in run.cfg.log_sinks:
        return
    if run.events is None:
        from torch.utils.tensorboard import SummaryWriter

        run.events = SummaryWriter(str(run.out), purge_step=row["step"])
    for tag, key in (("train/loss", "loss"), ("lr/decoder", "lr"), ("dev/wer", "dev_wer"), ("dev/cer", "dev_cer")):
        if row.get(key) not in (None, ""):
            run.events.add_scalar(tag, float(row[key]), row["step"])
    run.events.flush()


def _append_metrics(path: Path, row: dict) -> None:
    cols = ["step", "loss", "lr", "wall_s", "dev_wer", "dev_cer"]
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in cols})


def _save_checkpoint(path: Path, run: _Run, st: dict, best_state) -> None:
    ck = {"trainable": run.state(), "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
          "generator": run.gen.get_state(), "state": st, "best_state": best_state, "ctc_best": run.ctc_best}
    with atomic_path(path) as tmp:
        torch.save(ck, tmp)

