"""Training configuration: one frozen dataclass, read from YAML plus ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..core.constants import ADAPTER_KINDS, check_lang  # noqa: F401  (re-exported)
from ..core.precision import AMP_CHOICES
from ..data.units import parse_units
from ..models.modes import MODES, ModePolicy

logger = logging.getLogger(__name__)

# the first line of the config.yaml a run writes into its folder
RUN_CONFIG_HEADER = "# the resolved configuration of this run"
SEQ2SEQ_PARTS = ("decoder", "full", "lora", "lora_decoder")
SEQ2SEQ_WINDOWS = ("30", "clip")  # speechtl.models.seq2seq.WINDOWS (not imported here: it imports torch)
HEADS = ("linear", "bilstm")
SCHEDULES = ("tristage", "linear", "constant")
_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}


def _check_type(key: str, value: Any, annotation: str) -> None:
    """``value`` fits the field's annotation (``float | None``, ``int``, ...); ints pass for floats."""
    names = [t.strip() for t in str(annotation).split("|")]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config key {key!r}: must be a finite number (got {value!r})")
    if value is None:
        if "None" in names:
            return
        raise ValueError(f"config key {key!r}: a value is required (got none)")
    for name in names:
        t = _TYPES.get(name)
        if t is None:
            continue
        if t is bool and isinstance(value, bool):
            return
        if t in (int, float) and isinstance(value, bool):
            continue
        if isinstance(value, t) or t is float and isinstance(value, int):
            return
    wanted = " or ".join("none" if n == "None" else {"int": "an integer", "float": "a number", "bool": "true or false",
                                                       "str": "a string", "list": "a list", "dict": "a mapping"}.get(n, n)
                         for n in names)
    raise ValueError(f"config key {key!r}: expected {wanted}, got {value!r}")


def _f(default: Any, help: str):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    encoder: str = _f("default", "encoder: local HF directory, hub id, or 'default' (the bundled encoder)")
    mode: str = _f("frozen", "frozen | finetune | scratch | adapter (encoder fixed, small adapters and the head train; "
                              "one set per language) | seq2seq (Whisper's own encoder-decoder fine-tuned: see "
                              "seq2seq_train; encoder must be a Whisper model with its decoder, e.g. whisper-base)")
    seq2seq_train: str = _f("decoder", "mode=seq2seq: what trains: decoder (encoder fixed, run once per clip; the decoder "
                                       "at encoder_lr) | lora (LoRA on both halves at lr; lora_rank, lora_alpha) | "
                                       "lora_decoder (LoRA on the decoder at lr, the encoder fixed and run once per "
                                       "clip) | full (all but the convolutions, at encoder_lr)")
    seq2seq_window: str = _f("30", "mode=seq2seq: what the encoder sees of a clip: 30 (Whisper's 30 s window, as it "
                                   "was trained) | clip (each batch's longest clip plus 1 s, several times cheaper "
                                   "for short clips; only where the encoder trains, seq2seq_train=lora or full, so "
                                   "that it learns the shorter window; the model folder decodes the same way)")
    unlabelled: str | None = _f(None, "mode=seq2seq: a manifest of audio without transcripts (no 'text' field; clips "
                                      "of at most 30 s), used for self-training: after training on the labelled set, "
                                      "the best model transcribes it, the transcripts its confidence trusts "
                                      "(pseudo_min_confidence) join the labelled ones, and training goes on "
                                      "(self_train_rounds times)")
    seq2seq_ctc: bool = _f(False, "mode=seq2seq: also train a small CTC head (characters of the normalised text) on "
                                  "the same encoder outputs, and decode hybrid CTC/attention: a clip's CTC hypothesis "
                                  "replaces the decoder's where the two halves' joint score prefers it (loops, runaway "
                                  "text); the CTC weight is chosen on the dev set")
    seq2seq_ctc_lr: float | None = _f(None, "mode=seq2seq with seq2seq_ctc: the CTC head's learning rate (unset: lr)")
    seq2seq_beam_width: int = _f(1, "mode=seq2seq: at the end of training, beam search with this many beams is scored "
                                    "on the dev set against greedy decoding; the model folder decodes with whichever "
                                    "reads the lower dev CER (ties: the beams), written to its decoding.json (1: greedy, "
                                    "nothing tried)")
    self_train_rounds: int = _f(1, "mode=seq2seq with unlabelled: rounds of pseudo-labelling and further training, each "
                                    "of max_steps updates (0: none; the unlabelled audio then serves continue_steps only)")
    continue_steps: int = _f(0, "mode=seq2seq with unlabelled, seq2seq_train=lora or full: before training on "
                                "transcripts, this many updates of continued self-supervised training of the encoder on "
                                "the unlabelled and labelled audio (masked self-distillation: the encoder, spans of its "
                                "input masked, learns the unadapted encoder's outputs at those frames; 0: none)")
    continue_lr: float | None = _f(None, "continue_steps: peak learning rate (unset: lr with lora, encoder_lr with full)")
    continue_frames: str = _f("masked", "continue_steps: where the loss is taken: masked (the masked frames, as "
                                        "data2vec) | all (every frame of the clip, masked or not)")
    continue_mask_prob: float = _f(0.65, "continue_steps: share of encoder frames masked (an upper bound: spans of "
                                         "mask_time_length frames overlap)")
    pseudo_min_confidence: float = _f(0.5, "mode=seq2seq with unlabelled: the least confidence (geometric mean of the "
                                            "token probabilities) of a pseudo-label that is kept")
    pseudo_label_max_minutes: float | None = _f(None, "mode=seq2seq with unlabelled: stop pseudo-labelling after this "
                                                      "many minutes in each round; the clips are taken in a random "
                                                      "order (seed), so those labelled are a random part of them "
                                                      "(unset: all)")
    dev_fraction: float = _f(0.1, "without dev: this fraction of the labelled clips (4 to 100; clips with the same text "
                                  "kept together) is held out as the dev set for best-update selection, early stopping "
                                  "and LM tuning; CTC modes carve one only from 40 clips up (0 = never); mode=seq2seq "
                                  "always does")
    lm: str | None = _f("auto", "the word LM the model folder carries, which evaluate and transcribe use unless told otherwise "
                         "(CTC modes): auto (an n-gram of the training transcripts, plus lm_wordlist's words) | none "
                         "(greedy decoding) | PATH.arpa (copied in); its weight and word bonus are tuned on dev, and "
                         "the folder decodes greedily if the LM does worse there")
    lm_wordlist: str | None = _f(None, "lm=auto: add this language's 50,000 most frequent words (wordfreq) to the LM, "
                                       "e.g. ro (unset: the training transcripts only)")
    lm_order: int = _f(3, "lm=auto: n-gram order")
    lm_beam_width: int = _f(32, "beams of the folder's LM decoding")
    train: str = _f("", "training manifest (JSONL)")
    dev: str | None = _f(None, "dev manifest for WER/CER, best-checkpoint selection and early stopping")
    out: str = _f("exp/run", "output directory (checkpoints, metrics.csv, model/)")
    max_steps: int = _f(1000, "optimiser updates to run")
    max_minutes: float | None = _f(None, "wall-clock budget in minutes, summed over resumed runs")
    seed: int = _f(0, "random seed (weights, data order, dropout, masking)")
    # head
    head: str = _f("linear", "head type: linear | bilstm (bilstm: frozen mode only)")
    head_dropout: float = _f(0.1, "dropout in the head")
    bilstm_hidden: int = _f(256, "BiLSTM units per direction")
    bilstm_layers: int = _f(2, "BiLSTM layers")
    # optimisation
    lr: float = _f(1e-3, "peak learning rate of the head (and layer weights; and adapters, in adapter mode)")
    encoder_lr: float = _f(5e-5, "peak learning rate of the encoder (finetune/scratch)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    schedule: str = _f("tristage", "tristage (warm-up, hold, exponential decay) | linear | constant")
    warmup: float = _f(0.1, "warm-up: steps, or a fraction of max_steps if < 1")
    hold: float = _f(0.4, "tristage hold: steps, or a fraction of max_steps if < 1")
    freeze_encoder_steps: int = _f(0, "finetune: keep the transformer frozen for this many updates")
    freeze_layers: int = _f(0, "finetune: keep the CNN, what feeds the first transformer layer, and the first N layers "
                              "fixed; train the layers above (and the head)")
    layer_lr_decay: float = _f(1.0, "finetune/scratch: each encoder layer's learning rate is encoder_lr x this per "
                                    "layer below the top (1 = one rate for the whole encoder)")
    # adapters (mode=adapter)
    adapter: str | None = _f(None, "mode=adapter: lora (LoRA on every layer's attention and feed-forward projections, via "
                                   "peft; any encoder) | mms (a bottleneck adapter in every layer, transformers' "
                                   "wav2vec2 adapter_attn_dim; wav2vec2 encoders); unset: the init_from model's kind, "
                                   "else lora")
    lang: str | None = _f(None, "mode=seq2seq: the language Whisper writes (cs, ro, ...; unset: the training "
                                "manifest's). mode=adapter: the language this run trains, saved as adapter.<lang>.safetensors beside the "
                                "base encoder; with init_from=ADAPTER_MODEL it joins the languages that model has "
                                "(unset: the lang of the training manifest, when it names one)")
    lora_rank: int | None = _f(None, "adapter=lora: rank of the LoRA update matrices (unset: 8, or the init_from model's)")
    lora_alpha: float | None = _f(None, "adapter=lora: LoRA scale; updates are multiplied by lora_alpha / lora_rank "
                                        "(unset: 2 x lora_rank, or the init_from model's)")
    adapter_dim: int | None = _f(None, "adapter=mms: bottleneck width of each layer's adapter, transformers' "
                                       "adapter_attn_dim (unset: 16, or the init_from model's)")
    freeze_feature_encoder: bool | None = _f(None, "freeze the CNN feature encoder (default: yes for finetune, no for scratch)")
    max_batch_seconds: float = _f(60.0, "cap on padded audio seconds per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimiser update")
    clip_norm: float = _f(1.0, "gradient norm clipping (0 = off)")
    amp: str = _f("auto", "mixed precision: auto | bf16 | fp16 | none. Training autocasts on CUDA only; frozen "
                          "mode's training features also use bf16 on a CPU with AMX under auto (dev features: float32)")
    # encoder training-time options (finetune/scratch)
    mask_time_prob: float = _f(0.05, "SpecAugment-style time masking probability")
    mask_time_length: int = _f(10, "frames per time mask")
    mask_feature_prob: float = _f(0.0, "channel masking probability")
    mask_feature_length: int = _f(10, "channels per channel mask")
    layerdrop: float = _f(0.0, "probability of skipping a transformer layer")
    speed_perturb: list = _f([], "speed perturbation: every training clip is also used at these speed factors, "
                                 "e.g. [0.9, 1.1] (tempo and pitch change together, by resampling); every mode, "
                                 "in frozen mode as extra cached features")
    frozen_mask_time_prob: float = _f(0.0, "frozen mode: time masking of the summed layer features while training "
                                           "(spans of mask_time_length frames)")
    frozen_mask_feature_prob: float = _f(0.0, "frozen mode: channel masking of the summed layer features while training "
                                              "(spans of mask_feature_length channels)")
    augment: float = _f(0.0, "probability that a training clip is corrupted on the fly (reverb, telephone band, codec, "
                              "noise, gain: speechtl.data.augment); audio modes only, not from a feature cache")
    teacher: str | None = _f(None, "finetune/scratch: a frozen teacher encoder (e.g. whisper-base) whose hidden states "
                                   "the encoder learns to predict (layer distillation: L1 + cosine), alongside CTC; it "
                                   "hears the clean clip when augment is on")
    teacher_layers: list = _f([], "teacher hidden-state indices to predict (default: three spread up to its last layer); "
                                  "each is predicted from a student layer spread the same way")
    student_layers: list = _f([], "encoder hidden-state indices that predict teacher_layers, one each (default: spread "
                                  "the same way up to the encoder's last layer)")
    distill_weight: float = _f(1.0, "weight of the distillation loss against CTC")
    # evaluation and checkpoints
    eval_every: int = _f(200, "updates between dev evaluations and checkpoints")
    save_every: int | None = _f(None, "updates between checkpoints (default: eval_every); resume loses at most this many")
    best_metric: str = _f("cer", "dev metric that selects the best checkpoint: cer | wer")
    patience: int = _f(0, "stop after this many evaluations without improvement (0 = never)")
    average_last: int = _f(0, "keep the weights of the last K evaluations and write their mean to out/model_avg, "
                              "scored on dev (0 = off)")
    resume: bool = _f(False, "continue from out/checkpoints/last.pt if it exists")
    overwrite: bool = _f(False, "start afresh in an out folder that holds a run or a model, replacing it (without "
                                "this or resume=true, such a folder is refused)")
    # data
    on_bad_audio: str = _f("error", "unreadable or missing audio in train/dev: error (stop before the first update, naming "
                                    "every such file) | skip (leave them out, listed in the log and train_summary.json)")
    max_duration: float | None = _f(60.0, "training clips longer than this many seconds are dropped with a count "
                                          "(dev recordings of any length are scored; those over 30 s from audio, in windows); none = keep all")
    vocab: str | None = _f(None, "vocab.json to use instead of building one from the training text (character units)")
    units: str = _f("char", "output units of the CTC head: char (characters) | bpe:N | unigram:N (subword pieces: a BPE "
                            "or unigram tokenizer of N units in all, blank and unknown included, is trained on the "
                            "training text only, saved as tokenizer.json in the model folder and used to decode; a word "
                            "runs from a piece that starts with the marker '\u2581' to the next one; modes frozen, "
                            "finetune and scratch)")
    init_from: str | None = _f(None, "start from this trained speechtl model (or run folder): its encoder and head; the "
                                     "output rows of characters it shares with this run's vocabulary are kept, new ones "
                                     "start fresh, removed ones are dropped (extend a model to a new character set); "
                                     "subword pieces likewise, between subword models only. "
                                     "mode=adapter: its encoder is the base; an adapter model's languages are kept "
                                     "and lang is added (or trained on, if it has it)")
    normalizer: dict = _f({}, "NormalizerConfig fields, e.g. {lowercase: true, mappings: {'ß': 'ss'}}")
    cache_features: bool = _f(True, "frozen mode: run the encoder once and train the head on its stored outputs")
    cache_max_gb: float = _f(4.0, "largest in-memory feature cache; bigger sets recompute the encoder each step")
    feature_cache: str | None = _f(None, "frozen mode: directory of on-disk feature caches (`speechtl extract`); "
                                         "train/ and dev/ are made there if missing or stale, and the encoder is then "
                                         "not kept in memory")
    num_workers: int | None = _f(None, "DataLoader worker processes decoding audio (unset: none for a small job, under 200 "
                                       "clips or 10 min of audio, and on a CPU with at most 4 cores; else 2 on a CPU, "
                                       "up to 8 on a GPU)")
    threads: int | None = _f(None, "CPU threads (unset: the CPUs this process may use, after taskset, a cgroup CPU "
                                   "quota and OMP_NUM_THREADS, each update on all of them or on one, whichever "
                                   "measures faster at the time; set: every update on that many, at most the "
                                   "CPUs, so that float results repeat exactly)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    log_every: int = _f(10, "updates between rows of metrics.csv")
    log: str = _f("csv", "where the training metrics go: csv (metrics.csv), or csv,tensorboard (also TensorBoard event "
                         "files beside it: losses, learning rates, audio hours, dev WER/CER and a few dev transcripts; "
                         "needs the tensorboard package, the 'tensorboard' extra; mode=seq2seq: loss, learning rate and dev "
                         "WER/CER); metrics.csv is always written")
    trust_remote_code: bool = _f(False, "allow custom model code from the hub (off by default)")

    def __post_init__(self) -> None:
        """Every value is checked here, so a bad one stops the run before any work however the
        configuration was made (YAML, ``key=value`` or Python), naming key, value and what is allowed."""
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        for key, choices in (("mode", MODES), ("head", HEADS), ("schedule", SCHEDULES), ("best_metric", ("cer", "wer")),
                             ("on_bad_audio", ("error", "skip")), ("amp", AMP_CHOICES),
                             ("seq2seq_train", SEQ2SEQ_PARTS), ("seq2seq_window", SEQ2SEQ_WINDOWS),
                             ("continue_frames", ("masked", "all"))):
            if getattr(self, key) not in choices:
                raise ValueError(f"config key {key!r}: {getattr(self, key)!r} is not one of {', '.join(choices)}")
        self._check_log()
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ValueError(f"config key 'device': {self.device!r} is not auto, cpu, cuda or cuda:N")
        at_least = {"max_steps": 1, "grad_accum": 1, "eval_every": 1, "log_every": 1, "bilstm_hidden": 1,
                    "bilstm_layers": 1, "mask_time_length": 1, "mask_feature_length": 1, "patience": 0,
                    "freeze_encoder_steps": 0, "num_workers": 0, "threads": 1, "save_every": 1, "freeze_layers": 0, "average_last": 0,
                    "lora_rank": 1, "adapter_dim": 1, "seq2seq_beam_width": 1, "continue_steps": 0}
        for key, low in at_least.items():
            v = getattr(self, key)
            if v is not None and v < low:
                raise ValueError(f"config key {key!r}: must be at least {low} (got {v!r})")
        positive = ("max_minutes", "max_batch_seconds", "cache_max_gb", "max_duration", "lora_alpha",
                    "pseudo_label_max_minutes", "seq2seq_ctc_lr", "continue_lr")
        for key in positive:
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ValueError(f"config key {key!r}: must be greater than 0 (got {v!r})")
        if not 0 < self.layer_lr_decay <= 1:
            raise ValueError(f"config key 'layer_lr_decay': must be in (0, 1] (got {self.layer_lr_decay!r})")
        if self.resume and self.overwrite:
            raise ValueError("config keys 'resume' and 'overwrite': resume=true continues the run in out, "
                             "overwrite=true replaces it; choose one")
        if self.init_from is not None and self.policy.random_init:
            raise ValueError("config key 'init_from': scratch mode starts from random weights; use finetune or frozen")
        self._check_adapter_keys()
        _check_decoding_keys(self)
        if parse_units(self.units)[0] != "char":
            if self.vocab is not None:
                raise ValueError(f"config key 'vocab': a character vocabulary, and units={self.units} trains a subword "
                                 "tokenizer on the training text instead; leave vocab unset, or use units=char")
            if not self.policy.subword_units:
                raise ValueError(f"config key 'units': mode=adapter keeps a character vocabulary per language; "
                                 f"units={self.units} is for modes frozen, finetune and scratch")
        if self.freeze_layers and not self.policy.freezes_layers:
            raise ValueError(f"config key 'freeze_layers': for mode=finetune (got mode={self.mode})")
        if not 0 <= self.augment <= 1:
            raise ValueError(f"config key 'augment': must be in [0, 1] (got {self.augment!r})")
        if self.teacher is not None and not self.policy.distills:
            raise ValueError("config key 'teacher': distillation trains the encoder; use mode=finetune or scratch")
        if self.teacher is not None and self.layerdrop > 0:
            raise ValueError("config key 'layerdrop': distillation predicts the teacher from fixed encoder layers, "
                             "which layerdrop would skip; set layerdrop=0 with a teacher")
        if self.augment and self.policy.cacheable and (self.cache_features or self.feature_cache):
            raise ValueError("config key 'augment': frozen mode trains from cached clean features; set "
                             "cache_features=false (and no feature_cache) to augment every step")
        for key in ("teacher_layers", "student_layers"):
            if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in getattr(self, key)):
                raise ValueError(f"config key {key!r}: expected non-negative integers, got {getattr(self, key)!r}")
        if self.student_layers and len(self.student_layers) != len(self.teacher_layers):
            raise ValueError(f"config key 'student_layers': {self.student_layers} needs one entry per teacher_layers entry "
                             f"({self.teacher_layers})")
        for key in ("lr", "encoder_lr", "weight_decay", "clip_norm", "warmup", "hold", "distill_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key {key!r}: must not be negative (got {getattr(self, key)!r})")
        for key in ("head_dropout", "layerdrop", "mask_time_prob", "mask_feature_prob", "frozen_mask_time_prob",
                    "frozen_mask_feature_prob"):
            v = getattr(self, key)
            if not 0 <= v < 1:
                raise ValueError(f"config key {key!r}: must be in [0, 1) (got {v!r})")
        for f in self.speed_perturb:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.5 <= f <= 2.0 or f == 1:
                raise ValueError(f"config key 'speed_perturb': each factor must be a number in [0.5, 2] other than 1 "
                                 f"(got {f!r}); the clips at their own speed are always used")
        if len({f"{f:g}" for f in self.speed_perturb}) != len(self.speed_perturb):
            raise ValueError(f"config key 'speed_perturb': repeated factor in {self.speed_perturb}")

    @property
    def policy(self) -> ModePolicy:
        """What this run's mode trains (:mod:`speechtl.models.modes`)."""
        return MODES[self.mode]

    @property
    def log_sinks(self) -> tuple[str, ...]:
        """Where metrics go besides metrics.csv (``("tensorboard",)`` or nothing)."""
        return tuple(x for x in (p.strip() for p in self.log.split(",")) if x and x != "csv")

    def _check_log(self) -> None:
        parts = [p.strip() for p in self.log.split(",")]
        bad = [p for p in parts if p not in ("csv", "tensorboard")]
        if bad or not any(parts):
            raise ValueError(f"config key 'log': {self.log!r} is not csv, tensorboard or csv,tensorboard")
        if "tensorboard" in parts:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ValueError("config key 'log': tensorboard needs the tensorboard package "
                                 "(pip install 'speechtl[tensorboard]')")

    def _check_adapter_keys(self) -> None:
        _check_seq2seq_keys(self)
        if self.policy.seq2seq:
            return
        adapter_keys = ("adapter", "lang", "lora_rank", "lora_alpha", "adapter_dim")
        if not self.policy.adapters:
            for key in adapter_keys:
                if getattr(self, key) is not None:
                    raise ValueError(f"config key {key!r}: for mode=adapter (this run is mode={self.mode})")
            return
        if self.adapter is not None and self.adapter not in ADAPTER_KINDS:
            raise ValueError(f"config key 'adapter': {self.adapter!r} is not one of {', '.join(ADAPTER_KINDS)}")
        if self.lang is not None:
            check_lang(self.lang)
        if self.adapter == "mms" and (self.lora_rank is not None or self.lora_alpha is not None):
            raise ValueError("config key 'lora_rank'/'lora_alpha': for adapter=lora (adapter=mms takes adapter_dim)")
        if self.adapter == "lora" and self.adapter_dim is not None:
            raise ValueError("config key 'adapter_dim': for adapter=mms (adapter=lora takes lora_rank and lora_alpha)")
        if self.layer_lr_decay != 1.0:
            raise ValueError("config key 'layer_lr_decay': for mode=finetune or scratch; in adapter mode the encoder "
                             "stays fixed")
        if self.freeze_feature_encoder is False:
            raise ValueError("config key 'freeze_feature_encoder': adapter mode keeps the whole base encoder fixed")
        if self.head != "linear":
            raise ValueError(f"config key 'head': adapter mode uses a linear head on the last layer (got {self.head!r})")

    def resolve_paths(self, base: Path) -> "TrainConfig":
        """Make manifest/vocab paths given in a YAML file relative to that file."""
        changes = {}
        for k in ("train", "dev", "vocab", "init_from", "unlabelled", "lm"):
            v = getattr(self, k)
            if v and not os.path.isabs(v) and not Path(v).exists() and (base / v).exists():
                changes[k] = str(base / v)
        return dataclasses.replace(self, **changes)


def _check_decoding_keys(self: "TrainConfig") -> None:
    """The keys of the folder's own decoding (:mod:`speechtl.training.words`) and of the carved dev set."""
    if not 0 <= self.dev_fraction < 0.5:
        raise ValueError(f"config key 'dev_fraction': must be in [0, 0.5) (got {self.dev_fraction!r})")
    if self.lm not in ("auto", "none", None):
        if not self.lm.endswith(".arpa"):
            raise ValueError(f"config key 'lm': auto, none or an .arpa file (got {self.lm!r})")
    if self.lm_order < 1 or self.lm_beam_width < 1:
        raise ValueError(f"config key 'lm_order'/'lm_beam_width': must be at least 1 (got {self.lm_order}, "
                         f"{self.lm_beam_width})")
    if self.lm_wordlist is not None:
        check_lang(self.lm_wordlist, "lm_wordlist")
    if self.policy.seq2seq and (self.lm not in ("auto", "none", None) or self.lm_wordlist is not None):
        raise ValueError("config key 'lm'/'lm_wordlist': a seq2seq model decodes with Whisper's own decoder; word LMs "
                         "are for CTC modes")


def _check_seq2seq_keys(self: "TrainConfig") -> None:
    """The keys of mode=seq2seq, and those it does not take."""
    if not self.policy.seq2seq:
        if self.seq2seq_train != "decoder":
            raise ValueError(f"config key 'seq2seq_train': for mode=seq2seq (this run is mode={self.mode})")
        if self.seq2seq_window != "30":
            raise ValueError(f"config key 'seq2seq_window': for mode=seq2seq (this run is mode={self.mode})")
        if self.seq2seq_beam_width != 1 or self.seq2seq_ctc_lr is not None:
            raise ValueError(f"config key 'seq2seq_beam_width'/'seq2seq_ctc_lr': for mode=seq2seq (this run is "
                             f"mode={self.mode})")
        if self.pseudo_label_max_minutes is not None:
            raise ValueError(f"config key 'pseudo_label_max_minutes': self-training is for mode=seq2seq (this run is "
                             f"mode={self.mode})")
        if self.unlabelled is not None:
            raise ValueError(f"config key 'unlabelled': self-training is for mode=seq2seq (this run is "
                             f"mode={self.mode})")
        if self.seq2seq_ctc:
            raise ValueError(f"config key 'seq2seq_ctc': for mode=seq2seq (this run is mode={self.mode})")
        if self.continue_steps:
            raise ValueError(f"config key 'continue_steps': continued pretraining of Whisper's encoder is for "
                             f"mode=seq2seq (this run is mode={self.mode})")
        return
    if not 0 < self.dev_fraction < 0.5:
        raise ValueError(f"config key 'dev_fraction': mode=seq2seq needs a dev set, so without dev=, it must be in "
                         f"(0, 0.5) (got {self.dev_fraction!r})")
    if self.lang is not None:
        check_lang(self.lang)
    for key in ("adapter", "adapter_dim", "vocab", "init_from", "teacher", "feature_cache"):
        if getattr(self, key) is not None:
            raise ValueError(f"config key {key!r}: not used by mode=seq2seq (Whisper's own tokenizer and decoder)")
    if parse_units(self.units)[0] != "char":
        raise ValueError(f"config key 'units': mode=seq2seq writes Whisper's own tokens (got units={self.units})")
    if self.seq2seq_window == "clip" and self.seq2seq_train not in ("lora", "full"):
        raise ValueError(f"config key 'seq2seq_window': clip is for seq2seq_train=lora or full, which train the encoder "
                         f"on the shorter window; with seq2seq_train={self.seq2seq_train} the encoder is fixed as "
                         "Whisper was trained, on its 30 s window")
    if not self.seq2seq_train.startswith("lora") and (self.lora_rank is not None or self.lora_alpha is not None):
        raise ValueError("config key 'lora_rank'/'lora_alpha': for seq2seq_train=lora or lora_decoder")
    if self.speed_perturb or self.augment:
        raise ValueError("config keys 'speed_perturb'/'augment': not available in mode=seq2seq")
    if not 0 <= self.pseudo_min_confidence <= 1:
        raise ValueError(f"config key 'pseudo_min_confidence': must be in [0, 1] (got {self.pseudo_min_confidence!r})")
    if self.self_train_rounds < 0:
        raise ValueError(f"config key 'self_train_rounds': must be at least 0 (got {self.self_train_rounds!r})")
    if not 0 < self.continue_mask_prob < 1:
        raise ValueError(f"config key 'continue_mask_prob': must be in (0, 1) (got {self.continue_mask_prob!r})")
    if self.continue_steps:
        if self.unlabelled is None:
            raise ValueError("config key 'continue_steps': continued pretraining trains the encoder on the unlabelled "
                             "audio; give unlabelled=AUDIO.jsonl")
        if self.seq2seq_train not in ("lora", "full"):
            raise ValueError(f"config key 'continue_steps': for seq2seq_train=lora or full, which train the encoder "
                             f"(got seq2seq_train={self.seq2seq_train})")
    elif self.unlabelled is not None and self.self_train_rounds == 0:
        raise ValueError("config key 'self_train_rounds': 0 with unlabelled and no continue_steps leaves the unlabelled "
                         "audio unused")


def config_help() -> str:
    return "\n".join(f"  {f.name:22s} {f.metadata.get('help', '')} (default: {_default(f)})" for f in fields(TrainConfig))


def _default(f) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def _coerce(key: str, v: Any, t: type) -> Any:
    if v is None and t is list:
        return []
    if v is None or t is type(None):
        return v
    if isinstance(v, str) and t in (int, float, bool):
        v = parse_value(v)
    if t is bool and isinstance(v, bool) or t is str and isinstance(v, str) or t is dict and isinstance(v, dict):
        return v
    if t is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if t is int and isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer():
        return int(v)
    if t is str and isinstance(v, (int, float)):
        return str(v)
    if t is list:
        if isinstance(v, str):  # key=0.9,1.1 on the command line
            v = [parse_value(x) for x in v.split(",") if x.strip()]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            v = [v]
        if isinstance(v, list):
            return v
    raise ValueError(f"config key {key!r}: expected {t.__name__}, got {v!r}")


# keys whose values are names, taken as written: YAML would read lang=no (Norwegian) as false
_VERBATIM = ("lang", "lm_wordlist", "seq2seq_window")  # strings even where they read as numbers


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise ValueError(f"override {p!r} is not key=value")
        k, v = p.split("=", 1)
        k = k.strip()
        value = parse_value(v)
        out[k] = v.strip() if k in _VERBATIM and value is not None else value
    return out


def parse_value(v: str) -> Any:
    """``3e-4`` -> float (YAML 1.1 would read a string), ``none``/empty -> None, else YAML."""
    v = v.strip()
    if not v or v.lower() in ("none", "null", "~"):
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return yaml.safe_load(v)


def load_train_config(path: str | os.PathLike | None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """YAML (may be None) then overrides; unknown keys are an error that lists the valid ones."""
    data: dict = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of key: value")
        base = path.resolve().parent
        if text.startswith(RUN_CONFIG_HEADER) and isinstance(data.get("out"), str) \
                and Path(data["out"]).resolve() != base and (base / "checkpoints").is_dir():
            # a run's own config.yaml in a copied or moved run folder: that folder is the run now
            logger.info("%s: a run's config, read from another folder than its out=%s; out is %s", path, data["out"], base)
            data["out"] = str(base)
    over = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    data.update(over)
    valid = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    for k, v in list(data.items()):
        data[k] = _coerce(k, v, type(_default(valid[k])))
    cfg = TrainConfig(**data)
    # paths in the YAML are relative to it; paths from the command line to the cwd
    yaml_only = {k for k in data if k not in over}
    if path is not None and yaml_only & {"train", "dev", "vocab", "init_from", "unlabelled"}:
        cfg = cfg.resolve_paths(base)
    if not cfg.train:
        raise ValueError("no training manifest: set train=PATH")
    return cfg
