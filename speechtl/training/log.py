"""``metrics.csv``: one row per logged update, kept in step with the checkpoint; with
``log=tensorboard`` the same figures (and a few dev transcripts) as TensorBoard events too."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..core.distributed import DistContext
from ..core.io import atomic_path, write_error

CSV_FIELDS = ["step", "epoch", "loss", "lr_head", "lr_encoder", "audio_hours", "elapsed_s", "dev_wer", "dev_cer", "distill_loss"]


class MetricsLog:
    """``out/metrics.csv``, written by rank 0. A row goes out before the checkpoint of its
    update: a kill between the two leaves a row that resume trims and writes again."""

    def __init__(self, path: Path, ctx: DistContext, tensorboard: bool = False):
        self.path = path
        self.ctx = ctx
        self.tensorboard = tensorboard and ctx.is_main
        self._writer = None  # made by trim(): it knows from which update on events are redone

    def _events(self, step: int):
        """TensorBoard's writer (``torch.utils.tensorboard``), its files beside metrics.csv; on
        resume, events logged after the checkpoint's update are purged, as the rows are."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path.parent), purge_step=step + 1 if step else None)
        return self._writer

    def trim(self, step: int) -> None:
        """On resume, forget rows logged after the checkpoint (they will be redone), and a
        last row cut short by a killed process."""
        if self.tensorboard:
            self._events(step)
        if not self.ctx.is_main or not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        if not text.endswith("\n"):  # a row cut short: drop it
            text = text[: text.rfind("\n") + 1]
        rows = [r for r in csv.DictReader(io.StringIO(text, newline=""))
                if None not in r.values() and None not in r and r["step"].isdigit() and int(r["step"]) <= step]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def append(self, st, epoch: int, optimizer, row: dict) -> None:
        """One row: ``st``'s progress (a :class:`~speechtl.training.run.TrainState`) at ``epoch``, the
        optimiser's learning rates, and the evaluation's ``row`` (dev WER and CER, or nothing)."""
        if not self.ctx.is_main:
            return
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        new = not self.path.exists()
        try:
            self._write(new, st, epoch, lrs, row)
        except OSError as e:  # a full disk: say which file
            raise write_error(self.path, e) from e

    def _write(self, new: bool, st, epoch: int, lrs: dict, row: dict) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            w.writerow({"step": st.step, "epoch": epoch, "loss": st.loss, "lr_head": lrs.get("head"),
                        "lr_encoder": lrs.get("encoder", lrs.get("adapter", "")), "audio_hours": round(st.audio_seconds / 3600, 5),
                        "elapsed_s": round(st.elapsed, 2), "dev_wer": row.get("dev_wer", ""), "dev_cer": row.get("dev_cer", ""),
                        "distill_loss": "" if st.distill_loss is None else st.distill_loss})
        if self.tensorboard:
            self._write_events(st, lrs, row)

    def _write_events(self, st, lrs: dict, row: dict) -> None:
        w = self._events(st.step)
        scalars = {"train/loss": st.loss, "train/audio_hours": st.audio_seconds / 3600, "train/distill_loss": st.distill_loss,
                   "dev/wer": row.get("dev_wer"), "dev/cer": row.get("dev_cer"),
                   **{f"lr/{name}": lr for name, lr in lrs.items()}}
        for tag, value in scalars.items():
            if value is not None:
                w.add_scalar(tag, float(value), st.step)
        examples = row.get("dev_examples")
        if examples:  # a markdown table: TensorBoard's text tab renders it
            lines = ["| utterance | reference | hypothesis |", "|---|---|---|"]
            cell = lambda x: str(x).replace("|", "\\|") or " "  # noqa: E731
            lines += [f"| {cell(i)} | {cell(ref)} | {cell(hyp)} |" for i, ref, hyp in examples]
            w.add_text("dev/transcripts", "\n".join(lines), st.step)
        w.flush()
