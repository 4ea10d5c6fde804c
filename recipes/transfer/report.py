#!/usr/bin/env python3
"""Collect the transfer runs into results.json, results.md and cer_vs_minutes.png.

Reads ``RUNS/runs/<target>/<minutes>min/<mode>/`` (``train_summary.json``,
``metrics.csv``, ``test/summary.json``) for every run that finished; missing runs are
left out of the table and listed.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

MODES = ("frozen", "finetune", "scratch")
TRANSFER = ("frozen", "finetune")


def read_runs(root: Path) -> list[dict]:
    rows = []
    for summary in sorted(root.glob("runs/*/*min/*/train_summary.json")):
        run = summary.parent
        test = run / "test" / "summary.json"
        if not test.is_file():
            continue
        s, t = json.loads(summary.read_text()), json.loads(test.read_text())
        minutes = int(re.fullmatch(r"(\d+)min", run.parent.name).group(1))
        rows.append({
            "target": run.parent.parent.name, "minutes": minutes, "mode": run.name,
            "steps": s["steps"], "wall_time_s": s["wall_time_s"], "train_hours": s["train_hours"],
            "best_step": s["best_step"], "test_cer": t["cer"], "test_wer": t["wer"],
            "test_utterances": t["utterances"], "dev_curve": dev_curve(run / "metrics.csv"),
        })
    return rows


def dev_curve(path: Path) -> list[tuple[float, float]]:
    """(elapsed seconds, dev CER) at every evaluation."""
    with open(path, newline="") as f:
        return [(float(r["elapsed_s"]), float(r["dev_cer"])) for r in csv.DictReader(f) if r.get("dev_cer")]


def checks(rows: list[dict]) -> list[str]:
    """The transfer claims, computed from the runs (not asserted)."""
    lines = []
    by = {(r["target"], r["minutes"], r["mode"]): r for r in rows}
    for (target, minutes, mode), r in sorted(by.items()):
        if mode != "scratch":
            continue
        transfer = [by[(target, minutes, m)] for m in TRANSFER if (target, minutes, m) in by]
        if not transfer:
            continue
        best = min(transfer, key=lambda x: x["test_cer"])
        ratio = best["test_cer"] / r["test_cer"] if r["test_cer"] else float("inf")
        # four decimals: a ratio of 0.5001 must not print as 0.50
        lines.append(f"{target}, {minutes} min: best transfer ({best['mode']}) test CER {best['test_cer']:.4f} vs scratch "
                     f"{r['test_cer']:.4f}, ratio {ratio:.4f} ({'at most' if ratio <= 0.5 else 'more than'} half)")
        frozen = by.get((target, minutes, "frozen"))
        if frozen:
            final = r["dev_curve"][-1][1] if r["dev_curve"] else None
            reached = next((t for t, cer in frozen["dev_curve"] if final is not None and cer <= final), None)
            if reached is None:
                lines.append(f"  frozen never reached scratch's final dev CER ({final})")
            else:
                lines.append(f"  frozen reached scratch's final dev CER {final:.3f} after {reached:.0f} s, "
                             f"{reached / r['wall_time_s']:.2f} of scratch's {r['wall_time_s']:.0f} s")
    return lines


def table(rows: list[dict]) -> str:
    out = ["| target | labelled min | mode | updates | train wall s | test CER | test WER |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["target"], r["minutes"], MODES.index(r["mode"]))):
        out.append(f"| {r['target']} | {r['minutes']} | {r['mode']} | {r['steps']} | {r['wall_time_s']:.0f} | "
                   f"{r['test_cer']:.3f} | {r['test_wer']:.3f} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows})
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), sharey=True, squeeze=False)
    for ax, target in zip(axes[0], targets):
        for mode, style in zip(MODES, ("o-", "s-", "^--")):
            pts = sorted((r["minutes"], r["test_cer"]) for r in rows if r["target"] == target and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), style, label=mode)
        ax.set_xscale("log")
        ax.set_title(target)
        ax.set_xlabel("labelled minutes")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test CER")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="the recipe's --out folder")
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md and the plot")
    args = ap.parse_args()
    rows = read_runs(args.root)
    if not rows:
        raise SystemExit(f"no finished, scored runs under {args.root}/runs")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    report = table(rows) + "\n\n" + "\n".join(checks(rows)) + "\n"
    (args.out / "results.md").write_text(report)
    plot(rows, args.out / "cer_vs_minutes.png")
    print(report)


if __name__ == "__main__":
    main()
