"""The BiLSTM head on a CPU, forward pass: on ``--threads`` intra-op threads against one
thread, in the same process, alternating; both give the same logits.

``--busy N`` starts N processes that spin on a core each for the whole run, the way a
second job on a small machine does; a 2-core machine with one busy process is where
splitting each time step's small matrix product across threads stalls.

    python benchmarks/bench_lstm_threads.py [--busy 1] [--threads 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_label, machine  # noqa: E402

from speechtl.models.heads import BiLSTMHead  # noqa: E402


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", type=int, default=0, help="processes spinning beside the benchmark (default 0)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads against one (default 2)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=500, help="frames per clip (50 per second of audio)")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()

    torch.manual_seed(0)
    head = BiLSTMHead(384, 40, hidden_size=args.hidden, num_layers=2).eval()
    x = torch.randn(args.batch, args.frames, 384)
    lengths = torch.full((args.batch,), args.frames)
    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for s in spinners:
        s.start()
    torch.set_num_threads(args.threads)
    many, one = f"{args.threads} threads", "1 thread"
    times: dict[str, list[float]] = {many: [], one: []}

    def on(threads):
        def run():
            torch.set_num_threads(threads)
            return head(x, lengths)
        return run

    try:
        with torch.inference_mode():
            torch.testing.assert_close(on(args.threads)(), on(1)(), atol=1e-5, rtol=1e-4)
            for _ in range(args.rounds):
                for name, fn in ((many, on(args.threads)), (one, on(1))):
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
    finally:
        stop.set()
        for s in spinners:
            s.join()
    result = {"machine": machine(), "busy_processes": args.busy, "threads": args.threads,
              "shape": [args.batch, args.frames, args.hidden],
              "seconds": {k: {"best": round(min(v), 3), "worst": round(max(v), 3),
                              "median": round(sorted(v)[len(v) // 2], 3)} for k, v in times.items()}}
    print(f"CPU: {cpu_label()}; {args.busy} busy process(es)")
    for k, v in result["seconds"].items():
        print(f"  {k:24s} best {v['best']:.3f} s  median {v['median']:.3f} s  worst {v['worst']:.3f} s")
    a, b = result["seconds"][many]["median"], result["seconds"][one]["median"]
    print(f"  median time ratio ({many} / {one}): {a / b:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
