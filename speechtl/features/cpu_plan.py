"""How a frozen encoder runs over many clips on this CPU, chosen by timing rather than by rule.

Two choices decide a CPU's throughput, and which way wins depends on the CPU (its vector
and matrix units, its caches, its core count) and on the encoder's shape:

- **streams**: one batch at a time split across all intra-op threads, or one batch per
  core side by side, each on one thread (:func:`speechtl.features.extract.encode_batches`);
- **the CNN**: transformers' convolutions or speechtl's time-major ones
  (:mod:`speechtl.encoders.fast_cnn`; wav2vec2-family encoders only).

:func:`choose` times each way on a few seconds of synthetic audio the first time an
encoder of a given shape runs on a machine, and keeps the winner in
``$SPEECHTL_CACHE/schedules.json`` (default ``~/.cache/speechtl``), keyed by the CPU, the
thread count, the torch release, the precision and the encoder's configuration; later runs
read it back. Only jobs big enough to repay the probe calibrate (``extract`` on at least
200 clips and 10 minutes of audio); smaller ones keep the defaults (one stream per core and the
time-major CNN).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.paths import cache_root
from ..core.precision import encoder_autocast_dtype
from ..core.threads import cpu_streams
from ..data.loader import Batch
from .encode import encode_batches

logger = logging.getLogger(__name__)

PROBE_CLIP_SECONDS = 2.0
SCHEDULE_STORE_SIZE = 64  # machines x encoder shapes kept; the oldest go first


@dataclass(frozen=True)
class Schedule:
    streams: int  # batches run at once, each on one intra-op thread (1: one batch on all threads)
    fast_cnn: bool  # the time-major CNN (wav2vec2-family CNNs on a CPU)


def store_path() -> Path:
    return cache_root() / "schedules.json"


def cpu_name() -> str:
    """The CPU's model name, from /proc/cpuinfo (else what platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(encoder, amp_dtype) -> str:
    """What the timing depends on: the CPU, the threads, torch, the precision and the
    encoder's shape (its configuration; the weights' values do not change the speed)."""
    config = encoder.config.to_json_string(use_diff=False) if hasattr(encoder.config, "to_json_string") else repr(encoder.config)
    parts = [cpu_name(), str(torch.get_num_threads()), torch.__version__, str(amp_dtype), config]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def default_schedule(encoder, device) -> Schedule:
    return Schedule(cpu_streams(device), bool(getattr(encoder, "fast_cnn", False)))


def candidates(encoder, device) -> list[Schedule]:
    """The ways worth timing: several streams and one, each CNN the encoder can run."""
    n = cpu_streams(device)
    streams = [n, 1] if n > 1 else [1]
    cnns = [True, False] if getattr(encoder, "fast_cnn", False) else [False]
    return [Schedule(s, c) for s in streams for c in cnns]


def _read_store(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_store(path: Path, store: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        items = sorted(store.items(), key=lambda kv: kv[1].get("at", 0))[-SCHEDULE_STORE_SIZE:]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(items), indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:  # an unwritable cache only costs the probe next time
        logger.debug("could not keep the schedule in %s: %s", path, e)


def _probe_batches(streams: int, rate: int = 16_000):
    """Two batches per stream of two clips each, synthetic speech-like noise (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    n = int(PROBE_CLIP_SECONDS * rate)
    batches = []
    for b in range(2 * streams):
        wav = torch.randn(2, n, generator=g) * 0.1
        batches.append(Batch(wav, torch.tensor([n, n - rate // 4]), torch.zeros(2, 0, dtype=torch.long),
                             torch.zeros(2, dtype=torch.long), [f"probe{b}a", f"probe{b}b"], ["", ""],
                             [PROBE_CLIP_SECONDS] * 2))
    return batches


def time_schedule(encoder, device, schedule: Schedule, amp: str) -> float:
    """Seconds per audio second of ``encoder`` run the ``schedule`` way over the probe."""
    saved = getattr(encoder, "fast_cnn", False)
    encoder.fast_cnn = schedule.fast_cnn and saved
    try:
        warm = _probe_batches(1)[:1]
        with closing(encode_batches(encoder, warm, device, streams=1, amp=amp)) as it:
            for _ in it:
                pass
        batches = _probe_batches(schedule.streams)
        audio = sum(sum(b.durations) for b in batches)
        t0 = time.perf_counter()
        with closing(encode_batches(encoder, batches, device, streams=schedule.streams, amp=amp)) as it:
            for _ in it:
                pass
        return (time.perf_counter() - t0) / audio
    finally:
        encoder.fast_cnn = saved


def choose(encoder, device, amp: str = "auto", calibrate: bool = True) -> Schedule:
    """The fastest schedule for ``encoder`` on this CPU: read back from the store, else
    timed now (when ``calibrate``) and stored, else the default. GPUs run one stream."""
    device = torch.device(device)
    if device.type != "cpu":
        return Schedule(1, False)
    options = candidates(encoder, device)
    if len(options) == 1:
        return options[0]
    key = machine_key(encoder, encoder_autocast_dtype(device, amp))
    path = store_path()
    store = _read_store(path)
    kept = store.get(key)
    if isinstance(kept, dict) and isinstance(kept.get("schedule"), dict):
        try:
            found = Schedule(int(kept["schedule"]["streams"]), bool(kept["schedule"]["fast_cnn"]))
            if found in options:
                return found
        except (KeyError, TypeError, ValueError):
            pass
    if not calibrate:
        return default_schedule(encoder, device)
    t0 = time.perf_counter()
    timings = {}
    was_training = encoder.training
    encoder.eval()
    try:
        for s in options:
            timings[s] = time_schedule(encoder, device, s, amp)
    finally:
        encoder.train(was_training)
    best = min(options, key=lambda s: timings[s])
    logger.info("timed %d ways of running the encoder on this CPU in %.1f s; fastest: %d stream(s), %s CNN "
                "(kept in %s)", len(options), time.perf_counter() - t0, best.streams,
                "time-major" if best.fast_cnn else "transformers'", path)
    store[key] = {"schedule": asdict(best), "at": time.time(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
                  "seconds_per_audio_second": {f"streams={s.streams},fast_cnn={s.fast_cnn}": round(v, 5)
                                               for s, v in timings.items()}}
    _write_store(path, store)
    return best
