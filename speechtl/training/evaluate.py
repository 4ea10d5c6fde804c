"""Evaluation during training: dev scoring (gathered across ranks), keeping the best model,
snapshots for ``average_last``, and their average."""

from __future__ import annotations

import logging
from dataclasses import asdict

from ..core import distributed as dist_util
from ..decoding.metrics import ScoreReport, write_results
from ..inference.recognizer import decode_hyps, score_hyps
from ..models.average import mean_of_snapshots, write_snapshot
from ..models.model_dir import save_model_dir
from .build import DEV_WINDOW_S
from .checkpoint import trainable_state
from .run import Run

logger = logging.getLogger(__name__)

DEV_EXAMPLES = 3  # dev transcripts shown in TensorBoard at each evaluation (log=tensorboard)


def score_dev(run: Run) -> ScoreReport:
    """The dev set's score: each rank decodes its share, and the hypotheses are scored once."""
    data = run.data
    hyps = decode_hyps(run.model, data.vocab, data.normalizer, run.dev_mine, run.device,
                       max_batch_seconds=max(run.cfg.max_batch_seconds, 60.0), features=run.dev_features,
                       chunk_length_s=DEV_WINDOW_S)
    if run.ctx.enabled:
        hyps = {k: v for part in dist_util.gather_objects(hyps, run.ctx) for k, v in part.items()}
    return score_hyps(data.dev, hyps, data.normalizer)


def save_model(run: Run) -> None:
    """``out/model``: the model as it is now, with the run's step and configuration."""
    if run.ctx.is_main:
        save_model_dir(run.model, run.data.vocab, run.data.normalizer, run.out / "model",
                       extra={"step": run.state.step, "train_config": asdict(run.cfg)})


def evaluate_and_keep(run: Run) -> dict:
    """Score dev (when there is one) and keep the model if it is the best so far; the metrics row."""
    st = run.state
    if run.cfg.average_last:
        snapshot(run)
    if not run.data.dev:
        save_model(run)
        return {}
    report = score_dev(run)
    metric = report.cer if run.cfg.best_metric == "cer" else report.wer
    run.shown.update(dev_wer=f"{report.wer:.3f}", dev_cer=f"{report.cer:.3f}")
    logger.info("step %d: dev WER %.4f CER %.4f (loss %.4f)", st.step, report.wer, report.cer, st.loss or 0.0)
    if st.best is None or metric < st.best["metric"]:
        st.best = {"metric": metric, "wer": report.wer, "cer": report.cer}
        st.best_step = st.step
        st.bad_evals = 0
        save_model(run)
        if run.ctx.is_main:
            write_results(report, run.out / "dev")
    else:
        st.bad_evals += 1
    examples = [(r.id, r.ref, r.hyp) for r in report.results[:DEV_EXAMPLES]]
    return {"dev_wer": report.wer, "dev_cer": report.cer, "dev_examples": examples}


def snapshot(run: Run) -> None:
    """The trainable weights at this evaluation, for ``average_last``; the last K are kept."""
    if run.ctx.is_main:
        write_snapshot(run.out / "checkpoints", run.state.step, trainable_state(run.model), run.cfg.average_last)


def average_snapshots(run: Run) -> dict | None:
    """Write the mean of the kept snapshots to ``out/model_avg`` and score it on dev (every
    rank takes part: dev scoring is gathered across ranks)."""
    dist_util.barrier(run.ctx)  # rank 0 wrote the snapshots
    found = mean_of_snapshots(run.out / "checkpoints", run.cfg.average_last)
    if found is None:
        return None
    steps, mean = found
    run.model.load_state_dict(mean, strict=False)
    data = run.data
    if run.ctx.is_main:
        save_model_dir(run.model, data.vocab, data.normalizer, run.out / "model_avg",
                       extra={"averaged_steps": steps, "train_config": asdict(run.cfg)})
    result: dict = {"steps": steps, "model_dir": str(run.out / "model_avg")}
    if data.dev:
        report = score_dev(run)
        if run.ctx.is_main:
            write_results(report, run.out / "dev_avg")
        result.update(dev_wer=report.wer, dev_cer=report.cer)
        logger.info("average of steps %s: dev WER %.4f CER %.4f", steps, report.wer, report.cer)
    return result
