#!/usr/bin/env bash
# Pretrain the bundled default encoder: multilingual phoneme CTC on espeak-ng speech.
#   stage 0  synthesise train (MINUTES per language) and held-out dev speech
#   stage 1  phoneme-target manifests (IPA from espeak-ng, stress removed)
#   stage 2  a random-initialised small wav2vec2 encoder (6 layers, 256 wide)
#   stage 3  train it with CTC on phonemes (speechtl train, mode=scratch)
#   stage 4  install the encoder as speechtl/pretrained/default with its model card
# Usage: recipes/pretrain/run.sh [--stage N] [--stop-stage N] [--out DIR] [key=value ...]
# key=value pairs go to `speechtl train` (e.g. device=cuda max_batch_seconds=400).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
stage=0; stop_stage=4; out=${PRETRAIN_OUT:-$root/exp/pretrain}; minutes=${PRETRAIN_MINUTES:-15}
. "$here/../parse_options.sh"
PY=${PYTHON:-$root/.venv/bin/python}
st() { "$PY" -m speechtl "$@"; }
# Reserved for transfer evaluation, never pretrained on: cs it pl sw nl tr
LANGS="en-us de es fr-fr pt ru fi sv hu ro"

if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
    i=0
    for lang in $LANGS; do
        i=$((i + 1))
        st synth --lang "$lang" --minutes "$minutes" --out "$out/data/train/$lang" --seed $((100 + i)) --speakers 24 -q
        st synth --lang "$lang" --minutes 1 --out "$out/data/dev/$lang" --seed $((200 + i)) --speakers 6 --prefix dev- -q
    done
fi
if [ $stage -le 1 ] && [ $stop_stage -ge 1 ]; then
    "$PY" "$here/phonemize.py" "$out"/data/train/*/manifest.jsonl --out "$out/data/train.jsonl" ${PRETRAIN_OPUS:+--opus "$PRETRAIN_OPUS/train"}
    "$PY" "$here/phonemize.py" "$out"/data/dev/*/manifest.jsonl --out "$out/data/dev.jsonl" ${PRETRAIN_OPUS:+--opus "$PRETRAIN_OPUS/dev"}
fi
if [ $stage -le 2 ] && [ $stop_stage -ge 2 ]; then
    "$PY" "$root/tools/make_random_encoder.py" --size small --out "$out/init" --seed 0
fi
if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
    st train "$here/conf/pretrain.yaml" encoder="$out/init" out="$out/ctc" \
        train="$out/data/train.jsonl" dev="$out/data/dev.jsonl" "${overrides[@]}"
fi
if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
    "$PY" "$here/install.py" "$out/ctc" --dest "$root/speechtl/pretrained/default"
fi
