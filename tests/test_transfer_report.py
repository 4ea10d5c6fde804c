"""The transfer recipe's report: rows read from run folders, the modes table and its disk
sizes, the scratch comparison."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parents[1] / "recipes" / "transfer" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("transfer_report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(root: Path, target: str, name: str, cer: float, trainable: int, files: dict[str, int]) -> None:
    run = root / "runs" / target / "10min" / name
    (run / "test").mkdir(parents=True)
    (run / "train_summary.json").write_text(json.dumps({
        "wall_time_s": 60.0, "steps": 600, "train_hours": 0.17, "best_step": 600,
        "trainable_parameters": trainable, "total_parameters": 9_000_000}))
    (run / "metrics.csv").write_text("step,elapsed_s,dev_cer\n600,60,0.1\n")
    (run / "test" / "summary.json").write_text(json.dumps({"cer": cer, "wer": 2 * cer, "utterances": 10}))
    for rel, size in files.items():
        f = run / "model" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x" * size)


def test_the_modes_table_counts_what_a_further_language_adds(tmp_path, report):
    enc = {"encoder/model.safetensors": 16_000_000, "encoder/config.json": 1_000, "speechtl.json": 2_000}
    for t, k in (("cs", 1.0), ("it", 0.5)):
        _run(tmp_path, t, "default-gen2b-frozen", 0.06 * k, 5_900_000, {**enc, "head.safetensors": 23_000_000})
        _run(tmp_path, t, "default-gen2b-lora", 0.08 * k, 240_000, {**enc, f"adapter.{t}.safetensors": 900_000})
        _run(tmp_path, t, "default-gen2b-finetune", 0.05 * k, 8_000_000, {**enc, "head.safetensors": 60_000})
        _run(tmp_path, t, "default-gen2b-scratch", 1.0, 8_000_000, {**enc, "head.safetensors": 60_000})
    _run(tmp_path, "cs", "enc-probe-frozen", 0.9, 1, {"head.safetensors": 10})  # one mode only: not in the table
    rows = report.read_runs(tmp_path)
    by = {(r["target"], r["encoder"], r["mode"]): r for r in rows}
    assert by[("cs", "default-gen2b", "lora")]["bytes_per_language"] == 900_000 + 2_000  # no encoder
    assert by[("cs", "default-gen2b", "frozen")]["bytes_per_language"] == 23_000_000 + 2_000
    assert by[("cs", "default-gen2b", "finetune")]["bytes_per_language"] == 16_000_000 + 1_000 + 2_000 + 60_000

    table = report.modes_table(rows).splitlines()
    assert len(table) == 2 + 4 and not any("enc-probe" in line for line in table)
    assert [line.split("|")[2].strip() for line in table[2:]] == ["frozen", "lora", "finetune", "scratch"]
    lora = table[3].split("|")
    assert lora[3].strip() == "0.24M" and lora[4].strip() == "0.90 MB" and lora[6].strip() == "0.080"

    (line,) = [c for c in report.checks(rows, []) if c.startswith("cs, 10 min")]
    assert "(finetune) test CER 0.0500 vs scratch 1.0000" in line and "at most half" in line
