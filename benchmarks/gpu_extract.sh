#!/usr/bin/env bash
# bench_extract.py on a GPU with the base-size encoder, for a GPU machine that has torch,
# transformers, safetensors and tqdm but no espeak-ng (and no network):
#
#   bash benchmarks/gpu_extract.sh prepare      # here: synthesise 10 min of Czech into exp/gpu_bench/speech
#                                               # and download the soundfile wheel into exp/gpu_bench/wheels
#   bash benchmarks/gpu_extract.sh run OUT_DIR  # there (carry exp/gpu_bench): writes OUT_DIR/extract_gpu_base.json
#
# Two rounds of (a)-(d) over 10 min of audio take well under 5 minutes on a data-centre GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=exp/gpu_bench
case "${1:-}" in
prepare)
    mkdir -p "$WORK/wheels"
    .venv/bin/python benchmarks/bench_extract.py --minutes 10 --synth-only "$WORK/speech"
    # the GPU machine's Python may differ from this one's: fetch a wheel for each likely version
    for v in 3.11 3.12 3.13; do
        .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$WORK/wheels" soundfile cffi pycparser typing-extensions
    done
    du -sh "$WORK"
    ;;
run)
    out=${2:?usage: gpu_extract.sh run OUT_DIR}
    mkdir -p "$out"
    PY=${PYTHON:-python3}
    if ! "$PY" -c "import soundfile" 2>/dev/null; then
        "$PY" -m pip install -q --no-index --find-links "$WORK/wheels" soundfile
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt" || true
    # DEVICE, ENCODERS, ROUNDS: for a trial of this script on a CPU; COMMANDS=on adds the
    # whole-command timings (off by default: they add six more runs of the whole job)
    PYTHONPATH=. "$PY" benchmarks/bench_extract.py --device "${DEVICE:-cuda}" --encoders "${ENCODERS:-base}" --rounds "${ROUNDS:-2}" \
        --commands "${COMMANDS:-off}" \
        --manifest "$WORK/speech/manifest.jsonl" --json "$out/extract_gpu_base.json" 2>&1 | tee "$out/extract_gpu_base.log"
    ;;
*)
    echo "usage: $0 prepare | run OUT_DIR" >&2
    exit 2
    ;;
esac
