#!/usr/bin/env python3
"""Collect the transfer runs into results.json, results.md, modes.md (the modes side by side
at 10 labelled minutes) and cer_vs_minutes.png.

Reads ``RUNS/runs/<target>/<minutes>min/<mode>/`` (the bundled encoder) and
``.../<encoder>-<mode>/`` (any other encoder): ``train_summary.json``, ``metrics.csv``,
``test/summary.json`` (greedy) and ``test-lm/summary.json`` (word LM), for every run that
finished, plus ``RUNS/runs/<target>/zeroshot-<encoder>/summary.json`` (Whisper's own
decoder, unadapted). Runs not yet scored are left out.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

MODES = ("frozen", "freeze2", "lora", "mms", "finetune", "scratch")
# modes whose model keeps the encoder it was given unchanged: a further language needs only
# what the run trained beside it (for adapters, adapter.<lang>.safetensors holds that)
SHARED_BASE = ("frozen", "lora", "mms")


# run names of the bundled encoder's generations, as the table shows them; "default" rows
# were made while the first generation was the bundled encoder
LABELS = {"default": "default, 1st gen", "default-gen2": "default, 2nd gen after 503 updates",
          "default-gen2b": "default, 2nd gen"}
ALIASES = {"default-gen1": "default"}  # a copy of the first generation, run after it stopped being the default


def label(encoder: str) -> str:
    return LABELS.get(encoder, encoder)


def mode_rank(mode: str) -> int:
    return MODES.index(mode) if mode in MODES else len(MODES)


def bytes_per_language(model: Path, mode: str) -> int | None:
    """Disk a further language adds: the files outside the shared encoder for modes that
    keep the encoder fixed, else the whole model folder (every language its own encoder)."""
    if not model.is_dir():
        return None
    files = [f for f in model.rglob("*") if f.is_file()]
    if mode in SHARED_BASE:
        files = [f for f in files if "encoder" not in f.relative_to(model).parts[:1]]
    return sum(f.stat().st_size for f in files)


def read_runs(root: Path) -> list[dict]:
    rows = []
    for summary in sorted(root.glob("runs/*/*min/*/train_summary.json")):
        run = summary.parent
        test = run / "test" / "summary.json"
        if not test.is_file():
            continue
        s, t = json.loads(summary.read_text()), json.loads(test.read_text())
        minutes = int(re.fullmatch(r"(\d+)min", run.parent.name).group(1))
        encoder, _, mode = run.name.rpartition("-")
        encoder = ALIASES.get(encoder, encoder)
        lm = run / "test-lm" / "summary.json"
        lm_t = json.loads(lm.read_text()) if lm.is_file() else {}
        rows.append({
            "target": run.parent.parent.name, "minutes": minutes, "mode": mode, "encoder": encoder or "default",
            "test_cer_lm": lm_t.get("cer"), "test_wer_lm": lm_t.get("wer"),
            "seconds_per_update": s["wall_time_s"] / max(s["steps"], 1),
            "steps": s["steps"], "wall_time_s": s["wall_time_s"], "train_hours": s["train_hours"],
            "best_step": s["best_step"], "test_cer": t["cer"], "test_wer": t["wer"],
            "test_utterances": t["utterances"], "dev_curve": dev_curve(run / "metrics.csv"),
            "trainable_parameters": s.get("trainable_parameters"), "total_parameters": s.get("total_parameters"),
            "bytes_per_language": bytes_per_language(run / "model", mode),
        })
    return rows


def read_zero_shot(root: Path) -> list[dict]:
    rows = []
    for summary in sorted(root.glob("runs/*/zeroshot-*/summary.json")):
        t = json.loads(summary.read_text())
        rows.append({"target": summary.parent.parent.name, "encoder": summary.parent.name[len("zeroshot-"):],
                     "test_cer": t["cer"], "test_wer": t["wer"], "test_utterances": t["utterances"]})
    return rows


def dev_curve(path: Path) -> list[tuple[float, float]]:
    """(elapsed seconds, dev CER) at every evaluation."""
    with open(path, newline="") as f:
        return [(float(r["elapsed_s"]), float(r["dev_cer"])) for r in csv.DictReader(f) if r.get("dev_cer")]


def checks(rows: list[dict], zero_shot: list[dict]) -> list[str]:
    """The transfer claims, computed from the runs (not asserted)."""
    lines = []
    by = {(r["target"], r["minutes"], r["encoder"], r["mode"]): r for r in rows}
    for (target, minutes, encoder, mode), r in sorted(by.items()):
        if mode != "scratch":
            continue
        transfer = [x for (t, m, e, _), x in by.items() if (t, m, e) == (target, minutes, encoder) and x["mode"] != "scratch"]
        if not transfer:
            continue
        best = min(transfer, key=lambda x: x["test_cer"])
        ratio = best["test_cer"] / r["test_cer"] if r["test_cer"] else float("inf")
        # four decimals: a ratio of 0.5001 must not print as 0.50
        lines.append(f"{target}, {minutes} min: best transfer of {label(encoder)} ({best['mode']}) test CER "
                     f"{best['test_cer']:.4f} vs scratch {r['test_cer']:.4f}, ratio {ratio:.4f} "
                     f"({'at most' if ratio <= 0.5 else 'more than'} half)")
    for z in zero_shot:
        mine = [r for r in rows if r["target"] == z["target"] and r["encoder"] == z["encoder"]]
        for minutes in sorted({r["minutes"] for r in mine}):
            cands = [r for r in mine if r["minutes"] == minutes]
            best = min(cands, key=lambda x: min(x["test_wer"], x["test_wer_lm"] if x["test_wer_lm"] is not None else 9))
            wer = min(best["test_wer"], best["test_wer_lm"] if best["test_wer_lm"] is not None else 9)
            cer = min(best["test_cer"], best["test_cer_lm"] if best["test_cer_lm"] is not None else 9)
            lines.append(f"{z['target']}, {minutes} min, {z['encoder']}: best adapted ({best['mode']}) CER {cer:.4f} "
                         f"WER {wer:.4f} vs zero-shot CER {z['test_cer']:.4f} WER {z['test_wer']:.4f}: WER "
                         f"{'better' if wer < z['test_wer'] else 'not better'}")
    return lines


def _rate(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(rows: list[dict], zero_shot: list[dict]) -> str:
    out = ["| target | labelled min | encoder | mode | updates | train wall s | s/update | test CER | test WER "
           "| CER, word LM | WER, word LM |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["target"], r["minutes"], r["encoder"] != "default", r["encoder"],
                                         mode_rank(r["mode"]))):
        out.append(f"| {r['target']} | {r['minutes']} | {label(r['encoder'])} | {r['mode']} | {r['steps']} | "
                   f"{r['wall_time_s']:.0f} | {r['seconds_per_update']:.2f} | {r['test_cer']:.3f} | {r['test_wer']:.3f} | "
                   f"{_rate(r['test_cer_lm'])} | {_rate(r['test_wer_lm'])} |")
    for z in zero_shot:
        out.append(f"| {z['target']} | 0 | {z['encoder']} | zero-shot (own decoder) | - | - | - | {z['test_cer']:.3f} | "
                   f"{z['test_wer']:.3f} | - | - |")
    return "\n".join(out)


def _size(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def _count(n) -> str:
    return "-" if not n else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def modes_table(rows: list[dict], minutes: int = 10) -> str:
    """The modes side by side at one labelled budget: CER/WER, trainable parameters, disk
    per further language and seconds per update, by encoder."""
    mine = [r for r in rows if r["minutes"] == minutes and not r["target"].startswith("noisy-")]
    targets = sorted({r["target"] for r in mine})
    head = " | ".join(f"{t} CER | {t} WER | {t} CER, LM" for t in targets)
    out = [f"| encoder | mode | trainable params | disk per further language | s/update (mean) | {head} |",
           "|---|---|---:|---:|---:|" + "---:|" * (3 * len(targets))]
    modes_of: dict[str, set] = {}
    for r in mine:
        modes_of.setdefault(r["encoder"], set()).add(r["mode"])
    # encoders compared across modes (single-mode experiments stay in results.md)
    keys = sorted({(r["encoder"], r["mode"]) for r in mine if len(modes_of[r["encoder"]]) > 1},
                  key=lambda k: (k[0] != "default-gen2b", k[0] != "default", k[0], mode_rank(k[1])))
    for enc, mode in keys:
        got = {r["target"]: r for r in mine if (r["encoder"], r["mode"]) == (enc, mode)}
        any_r = next(iter(got.values()))
        rate = sum(r["seconds_per_update"] for r in got.values()) / len(got)
        cells = " | ".join(f"{_rate(got[t]['test_cer'])} | {_rate(got[t]['test_wer'])} | {_rate(got[t].get('test_cer_lm'))}"
                           if t in got else "- | - | -" for t in targets)
        out.append(f"| {label(enc)} | {mode} | {_count(any_r.get('trainable_parameters'))} | "
                   f"{_size(any_r.get('bytes_per_language'))} | {rate:.2f} | {cells} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows})
    fig, axes = plt.subplots(1, len(targets), figsize=(4.2 * len(targets), 3.6), sharey=True, squeeze=False)
    for ax, target in zip(axes[0], targets):
        for enc in sorted({r["encoder"] for r in rows}, key=lambda e: e != "default"):
            for mode, style in zip(("frozen", "finetune", "scratch"), ("o-", "s-", "^--")):
                pts = sorted((r["minutes"], r["test_cer"]) for r in rows
                             if r["target"] == target and r["mode"] == mode and r["encoder"] == enc)
                if pts:
                    ax.plot(*zip(*pts), style, label=mode if enc == "default" else f"{enc} {mode}")
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
    ap.add_argument("--keep", type=Path, help="an earlier results.json: its rows stay where this machine lacks the run")
    args = ap.parse_args()
    rows = read_runs(args.root)
    zero_shot = read_zero_shot(args.root)
    if args.keep:  # rows of an earlier results.json whose runs are not on this machine
        here = {(r["target"], r["minutes"], r["encoder"], r["mode"]) for r in rows}
        old = json.loads(args.keep.read_text())
        old_runs = old["runs"] if isinstance(old, dict) else old
        for r in old_runs:
            r = {"encoder": "default", "test_cer_lm": None, "test_wer_lm": None,
                 "seconds_per_update": r["wall_time_s"] / max(r["steps"], 1), **r}
            if (r["target"], r["minutes"], r["encoder"], r["mode"]) not in here:
                rows.append(r)
        if isinstance(old, dict):
            seen = {(z["target"], z["encoder"]) for z in zero_shot}
            zero_shot += [z for z in old.get("zero_shot", []) if (z["target"], z["encoder"]) not in seen]
    if not rows:
        raise SystemExit(f"no finished, scored runs under {args.root}/runs")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"runs": rows, "zero_shot": zero_shot}, indent=2) + "\n")
    report = table(rows, zero_shot) + "\n\n" + "\n".join(checks(rows, zero_shot)) + "\n"
    (args.out / "results.md").write_text(report)
    (args.out / "modes.md").write_text(modes_table(rows) + "\n")
    plot(rows, args.out / "cer_vs_minutes.png")
    print(report)


if __name__ == "__main__":
    main()
