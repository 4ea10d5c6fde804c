"""A CTC companion for Whisper's decoder (``mode=seq2seq`` with ``seq2seq_ctc=true``):
hybrid CTC/attention decoding in its simplest form.

A small BiLSTM CTC head over characters learns from the same encoder outputs and the same
batches as the decoder. It cannot loop or write text past the end of the audio: every
character needs a frame. At decoding, each clip has two candidates, the decoder's own
hypothesis and the CTC head's greedy one, and each is scored by both halves::

    score(y) = w * log p_ctc(y | audio) + (1 - w) * log p_decoder(y | audio)

The decoder's hypothesis is kept unless the CTC candidate scores higher. A looping or
runaway hypothesis gets a very low CTC score (it needs more characters than the clip has
frames, or far more than the audio supports), so the CTC candidate replaces it; where the
two agree once normalised, the decoder's (cased, punctuated) text is kept. ``w`` is chosen
on the dev set at the end of training, among fixed weights and "off" (the decoder alone),
and written to the folder's ``speechtl.json`` (``ctc_weight``; ``null`` when off).

The folder keeps the head in ``ctc/``: ``head.safetensors``, ``vocab.json`` (the characters
of the normalised training text) and ``config.json`` (its sizes).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.audio import SAMPLE_RATE
from ..data.text import Normalizer, Vocabulary
from .ctc import ctc_loss
from .heads import BiLSTMHead
from .seq2seq import ENCODER_FRAME_S

CTC_DIR = "ctc"
WEIGHTS = (0.1, 0.3, 0.5, 0.7, 0.9)  # the weights dev chooses among (with "off")


@dataclass
class Companion:
    """The CTC head and its vocabulary."""

    head: BiLSTMHead
    vocab: Vocabulary
    config: dict

    @classmethod
    def build(cls, input_size: int, vocab: Vocabulary, hidden_size: int = 256, num_layers: int = 2) -> "Companion":
        config = {"input_size": input_size, "hidden_size": hidden_size, "num_layers": num_layers}
        return cls(BiLSTMHead(input_size, len(vocab), hidden_size, num_layers), vocab, config)

    def targets(self, normalizer: Normalizer, texts: Sequence[str]) -> list[list[int]]:
        """Character ids of the normalised texts; characters outside the vocabulary are left
        out (pseudo-labels may hold some)."""
        return [[i for i in self.vocab.encode(normalizer(t)) if i != self.vocab.unk_id] for t in texts]

    def log_probs(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, V) log-probabilities over the encoder outputs ``states`` (B, T, D)."""
        return F.log_softmax(self.head(states.float(), lengths).float(), dim=-1)

    def loss(self, states: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        """Mean CTC loss per target character; a clip too short for its text adds nothing."""
        return ctc_loss(self.head(states.float(), lengths), lengths, *_flat(targets))

    def transcribe(self, states: torch.Tensor, samples: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(log-probabilities, frame lengths, greedy texts) of the clips whose decoder inputs
        are ``states`` (B, T, D)."""
        lengths = frame_lengths(samples, states.shape[1])
        with torch.inference_mode():
            logp = self.log_probs(states, lengths)
        return logp, lengths, greedy(logp, lengths, self.vocab)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(folder / "head.safetensors"))
        self.vocab.save(folder / "vocab.json")
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> "Companion | None":
        """The folder's CTC head, or None where it has none."""
        from safetensors.torch import load_file

        folder = Path(model_dir) / CTC_DIR
        if not (folder / "head.safetensors").is_file():
            return None
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        vocab = Vocabulary.load(folder / "vocab.json")
        comp = cls.build(int(config["input_size"]), vocab, int(config["hidden_size"]), int(config["num_layers"]))
        state = load_file(str(folder / "head.safetensors"))
        want = comp.head.state_dict()
        bad = [k for k in want if k not in state or state[k].shape != want[k].shape]
        if bad or set(state) - set(want):
            raise ValueError(f"{folder / 'head.safetensors'}: does not match its config.json (first mismatch: "
                             f"{(bad or sorted(set(state) - set(want)))[0]})")
        comp.head.load_state_dict(state)
        comp.head.eval()
        return comp


def _flat(targets: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets concatenated, and their lengths, as CTC losses take them."""
    return (torch.tensor([i for t in targets for i in t], dtype=torch.long),
            torch.tensor([len(t) for t in targets], dtype=torch.long))


def frame_lengths(samples: Sequence[int], total: int) -> torch.Tensor:
    """Encoder frames of each clip itself (no margin), at least 1 and at most ``total``."""
    return torch.tensor([max(1, min(total, math.ceil(n / SAMPLE_RATE / ENCODER_FRAME_S))) for n in samples])


def greedy(logp: torch.Tensor, lengths: torch.Tensor, vocab: Vocabulary) -> list[str]:
    """Best-path texts: repeats collapsed, blanks dropped."""
    best = logp.argmax(-1)
    out = []
    for b in range(best.shape[0]):
        ids = torch.unique_consecutive(best[b, : int(lengths[b])]).tolist()
        out.append(" ".join(vocab.decode([i for i in ids if i != vocab.blank_id]).split()))
    return out


def ctc_scores(logp: torch.Tensor, lengths: torch.Tensor, targets: list[list[int]]) -> list[float]:
    """log p_ctc of each target (``-inf`` where the clip has too few frames for it)."""
    flat, tl = _flat(targets)
    nll = F.ctc_loss(logp.transpose(0, 1), flat, lengths, tl, blank=0, reduction="none", zero_infinity=False)
    return [-float(x) for x in nll]


@torch.inference_mode()
def decoder_scores(model, tokenizer, states: torch.Tensor, prefix: list[int], texts: Sequence[str]) -> list[float]:
    """log p_decoder of each text (its tokens and the end of text; the forced prefix not
    scored), row ``b`` of ``states`` being its clip's encoder outputs."""
    from transformers.modeling_outputs import BaseModelOutput

    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    limit = model.config.max_target_positions
    seqs = [(prefix + tokenizer.encode(" " + t.strip(), add_special_tokens=False))[: limit - 1] + [eot] for t in texts]
    t = max(len(s) for s in seqs) - 1
    inp = torch.full((len(seqs), t), eot, dtype=torch.long)
    labels = torch.full((len(seqs), t), -100, dtype=torch.long)
    for k, s in enumerate(seqs):
        inp[k, : len(s) - 1] = torch.tensor(s[:-1])
        labels[k, len(prefix) - 1: len(s) - 1] = torch.tensor(s[len(prefix):])
    logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=states.to(model.dtype)),
                   decoder_input_ids=inp.to(states.device)).logits.float()
    logp = F.log_softmax(logits, -1)
    labels = labels.to(logp.device)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels >= 0)
    return picked.sum(1).tolist()


@dataclass
class Candidates:
    """Each clip's candidates and their scores, for a batch of clips."""

    texts: list[list[str]]  # per clip: the decoder's hypotheses (its best first), then the CTC head's
    scores: list[list[tuple[float, float]]]  # per clip and text: (log p_ctc, log p_decoder)
    same: list[int | None]  # per clip: the decoder hypothesis equal to the CTC one once normalised
    confidence: list[float]  # the CTC candidate's: geometric mean of its frames' best probabilities

    @property
    def attention(self) -> list[str]:
        return [t[0] for t in self.texts]

    @property
    def ctc(self) -> list[str]:
        return [t[-1] for t in self.texts]

    @classmethod
    def join(cls, parts: Sequence["Candidates"]) -> "Candidates":
        """The candidates of several batches as one."""
        return cls(*([x for p in parts for x in getattr(p, f.name)] for f in fields(cls)))

    def choice(self, weight: float | None) -> list[int]:
        """The index of each clip's chosen text at ``weight`` (None: the decoder's best)."""
        out = []
        for texts, scores, same in zip(self.texts, self.scores, self.same):
            if weight is None:
                out.append(0)
                continue
            best = max(range(len(texts)), key=lambda j: (_mix(weight, *scores[j]), -j))
            # the CTC text, where a decoder hypothesis says the same: the decoder's cased, punctuated form
            out.append(same if best == len(texts) - 1 and same is not None else best)
        return out

    def pick(self, weight: float | None) -> list[tuple[str, bool]]:
        """(text, from CTC) per clip at ``weight`` (None: the decoder's best)."""
        return [(t[j], j == len(t) - 1) for t, j in zip(self.texts, self.choice(weight))]


def _mix(w: float, ctc: float, dec: float) -> float:
    if ctc == -math.inf:
        return -math.inf
    return w * ctc + (1 - w) * dec


def candidates(model, tokenizer, comp: Companion, normalizer: Normalizer, states: torch.Tensor,
               samples: Sequence[int], prefix: list[int], attention: Sequence[str] | Sequence[Sequence[str]]
               ) -> Candidates:
    """Each clip's candidates (``attention[b]``: the decoder's text, or its beams best first;
    then the CTC head's greedy text) and their scores; ``states`` (B, T, D) as the decoder
    sees them (:func:`speechtl.models.seq2seq.stack_hidden`)."""
    logp, lengths, ctc_texts = comp.transcribe(states, samples)
    texts = [([a] if isinstance(a, str) else list(a)) + [c] for a, c in zip(attention, ctc_texts)]
    counts = torch.tensor([len(t) for t in texts])
    flat = [x for t in texts for x in t]
    with torch.inference_mode():
        cs = ctc_scores(logp.repeat_interleave(counts, 0), lengths.repeat_interleave(counts, 0),
                        comp.targets(normalizer, flat))
        ds = decoder_scores(model, tokenizer, states.repeat_interleave(counts, 0), prefix, flat)
    scores, k = [], 0
    for t in texts:
        scores.append(list(zip(cs[k:k + len(t)], ds[k:k + len(t)])))
        k += len(t)
    same = [next((j for j, a in enumerate(t[:-1]) if normalizer(a) == t[-1]), None) for t in texts]
    best = logp.max(-1).values
    conf = [math.exp(float(best[b, : int(lengths[b])].mean())) for b in range(len(texts))]
    return Candidates(texts, scores, same, conf)
