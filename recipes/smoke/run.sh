#!/usr/bin/env bash
# Smoke recipe: the whole pipeline in a few minutes on CPU.
#   stage 0  a tiny random-initialised encoder (no download needed)
#   stage 1  synthesise train/dev/test speech with espeak-ng
#   stage 2  train frozen, finetune and scratch
#   stage 3  evaluate each on the test set and print a table
#   stage 4  export the finetune model for transformers, transcribe one file
# Usage: recipes/smoke/run.sh [--stage N] [--stop-stage N] [--out DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
stage=0; stop_stage=4; out=${SMOKE_OUT:-$root/exp/smoke}; lang=${SMOKE_LANG:-cs}
. "$here/../parse_options.sh"
PY=${PYTHON:-$root/.venv/bin/python}
st() { "$PY" -m speechtl "$@"; }
mkdir -p "$out"

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
    "$PY" "$root/tools/make_random_encoder.py" --size mini --out "$out/encoder" --seed 0
fi
if [ $stage -le 1 ] && [ $stop_stage -ge 1 ]; then
    st synth --lang "$lang" --minutes 3 --out "$out/data/train" --seed 1 --max-words 5 -q
    st synth --lang "$lang" --minutes 0.7 --out "$out/data/dev" --seed 2 --max-words 5 -q
    st synth --lang "$lang" --minutes 1 --out "$out/data/test" --seed 3 --max-words 5 -q
fi
if [ $stage -le 2 ] && [ $stop_stage -ge 2 ]; then
    for mode in frozen finetune scratch; do
        st train "$here/conf/$mode.yaml" encoder="$out/encoder" out="$out/$mode" \
            train="$out/data/train/manifest.jsonl" dev="$out/data/dev/manifest.jsonl" overwrite=true -q
    done
fi
if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
    for mode in frozen finetune scratch; do
        st evaluate "$out/$mode/model" "$out/data/test/manifest.jsonl" --out-dir "$out/$mode/test" -q > /dev/null
    done
    "$PY" - "$out" <<'PYEOF'
import json, sys
out = sys.argv[1]
print(f"{'mode':10s} {'steps':>6s} {'train s':>8s} {'test WER':>9s} {'test CER':>9s}")
for mode in ("frozen", "finetune", "scratch"):
    t = json.load(open(f"{out}/{mode}/train_summary.json"))
    e = json.load(open(f"{out}/{mode}/test/summary.json"))
    print(f"{mode:10s} {t['steps']:6d} {t['wall_time_s']:8.0f} {e['wer']:9.3f} {e['cer']:9.3f}")
PYEOF
fi
if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
    st export "$out/finetune/model" --out "$out/finetune/hf" -q
    wav=$(ls "$out"/data/test/wavs/*.wav | head -1)
    echo "transcript of $wav:"
    st transcribe "$out/finetune/model" "$wav" -q
fi
