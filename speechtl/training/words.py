"""Words by default: after training, a CTC model folder gets its own decoding.

An n-gram LM built from the training transcripts (plus a language's word list, with
``lm_wordlist``), or the LM ``lm=`` names, is written beside the model, its weight and
word bonus are tuned on the dev set, and ``decoding.json`` records the result, which
``evaluate``, ``transcribe`` and :class:`speechtl.Recognizer` then use unless told otherwise
(as a transformers ``Wav2Vec2ProcessorWithLM`` folder does). When beam search with the LM
does worse than greedy decoding on dev, the folder says greedy, and why.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..core.io import write_json
from ..decoding.options import DECODING_FILE, LM_FILE
from .config import TrainConfig

logger = logging.getLogger(__name__)

# the grid searched on dev: LM weight and word bonus (pyctcdecode's alpha and beta)
ALPHAS = (0.3, 0.5, 0.8, 1.2)
BETAS = (0.0, 1.0, 2.0)
UNTUNED = {"alpha": 0.5, "beta": 1.0}  # with no dev set, `speechtl lm tune`'s middle of the road
# tuning beam-decodes every dev clip once per grid point: clips of a sentence or a few, not recordings of hours
TUNE_MAX_CLIP_S = 30.0
TUNE_MAX_CLIPS = 200


def attach_decoding(cfg: TrainConfig, model_dir: Path, train_texts: list[str], dev, normalizer,
                    progress: bool = False) -> dict:
    """Write ``model_dir``'s LM and ``decoding.json`` per ``cfg.lm``; returns what was written
    (the summary's ``decoding``). ``train_texts``: the normalised training transcripts;
    ``dev``: the dev utterances (may be empty; the first 200 of at most 30 s are tuned on)."""
    if cfg.lm in ("none", None):
        return {"decoder": "greedy", "reason": "lm=none"}
    lm_path = model_dir / LM_FILE
    sources = _write_lm(cfg, lm_path, train_texts, normalizer)
    record = {"decoder": "beam", "lm": LM_FILE, "beam_width": cfg.lm_beam_width, **UNTUNED, "lm_sources": sources}
    dev = [u for u in dev if u.duration <= TUNE_MAX_CLIP_S][:TUNE_MAX_CLIPS]
    if dev:
        from ..inference.recognizer import Recognizer

        rec = Recognizer.load(model_dir, device="cpu")
        tuned = rec.tune_lm(dev, lm_path, ALPHAS, BETAS, cfg.lm_beam_width, progress=progress)
        best, greedy = tuned["best"], tuned["greedy"]
        record.update(alpha=best["alpha"], beta=best["beta"],
                      tuned_on={"utterances": tuned["utterances"], "greedy": greedy,
                                "beam": {"wer": best["wer"], "cer": best["cer"]}})
        if (best["wer"], best["cer"]) > (greedy["wer"], greedy["cer"]):
            record = {"decoder": "greedy", "reason": f"beam search with the LM scored dev WER {best['wer']:.4f} "
                      f"against greedy {greedy['wer']:.4f}", "lm": LM_FILE, "lm_sources": sources,
                      "tuned_on": record["tuned_on"]}
        logger.info("decoding on %d dev clips: greedy WER %.4f CER %.4f; LM (alpha %g, beta %g) WER %.4f CER %.4f: "
                    "the model decodes %s", tuned["utterances"], greedy["wer"], greedy["cer"], best["alpha"],
                    best["beta"], best["wer"], best["cer"], "with the LM" if record["decoder"] == "beam" else "greedily")
    else:
        logger.info("no dev clips of at most %g s: the model decodes with its LM at alpha %g, beta %g, untuned",
                    TUNE_MAX_CLIP_S, UNTUNED["alpha"], UNTUNED["beta"])
    write_json(model_dir / DECODING_FILE, record)
    return record


def _write_lm(cfg: TrainConfig, lm_path: Path, train_texts: list[str], normalizer) -> dict:
    from ..decoding.lm import wordlist_sentences, write_arpa

    if cfg.lm != "auto":  # the user's own LM, copied so that the folder stands alone
        shutil.copyfile(cfg.lm, lm_path)
        return {"file": str(Path(cfg.lm).resolve())}
    lines = [t for t in train_texts if t.strip()]
    words = wordlist_sentences(cfg.lm_wordlist, normalizer=normalizer) if cfg.lm_wordlist else []
    write_arpa(lines, lm_path, order=cfg.lm_order, extra_words=words)
    logger.info("LM: a %d-gram of %d training transcripts%s -> %s", cfg.lm_order, len(lines),
                f" and {len(words)} words of the {cfg.lm_wordlist} word list" if words else "", lm_path)
    return {"training_transcripts": len(lines), "order": cfg.lm_order,
            **({"wordlist": cfg.lm_wordlist, "wordlist_words": len(words)} if words else {})}
