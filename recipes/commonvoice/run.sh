#!/usr/bin/env bash
# Common Voice: adapt a pretrained encoder to one language of a Common Voice release.
#   stage 1  manifests of train.tsv, dev.tsv and test.tsv (DATA = OUT/data): every clip decoded
#            from mp3, mixed to mono and resampled to 16 kHz FLAC once; missing or unreadable
#            clips and empty sentences are skipped and listed in DATA/SPLIT.skipped.tsv; the
#            language's normaliser in DATA/normalizer.json
#   stage 2  speechtl train with conf/MODE.yaml, dev.tsv as the dev set (RUN = OUT/ENCODER-MODE)
#   stage 3  an n-gram LM of the training sentences (--lm train), or an ARPA file of yours
#            (--lm FILE.arpa), or none (--lm none)
#   stage 4  WER/CER on dev and test, greedy and with the LM (beam search; the LM weight and word
#            bonus chosen on dev unless --tune-lm false), into RUN/decode/SET[-lm]/
#   stage 5  the results table, printed and written to RUN/results.md and RUN/results.json
# A stage whose output exists is skipped, so the script can be rerun after an interruption
# (training resumes from its last checkpoint); delete a stage's output to redo it.
# Usage: recipes/commonvoice/run.sh --lang L --data CV_DIR [--encoder E] [--mode finetune|frozen]
#            [--out DIR] [--stage N] [--stop-stage N] [--lm train|none|FILE.arpa] [--lm-order 3]
#            [--beam-width 32] [--tune-lm true|false] [--jobs N] [--keep-mp3 false|true] [key=value ...]
#            (key=value goes to `speechtl train`)
#   CV_DIR is a release folder (cv-corpus-*/, holding L/) or its language folder L/.
#   --keep-mp3 true: no 16 kHz copies; the manifests point at the mp3 clips, decoded at every epoch.
#   Defaults: --encoder facebook/wav2vec2-xls-r-300m --mode finetune --out exp/commonvoice/L
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
lang=""; data=""; encoder=facebook/wav2vec2-xls-r-300m; mode=finetune; out=""
stage=1; stop_stage=5; lm=train; lm_order=3; beam_width=32; tune_lm=true
jobs=$(nproc 2>/dev/null || echo 4); keep_mp3=false
. "$here/../parse_options.sh"
die() { echo "$0: $*" >&2; exit 1; }
[ -n "$lang" ] || die "--lang is required (a Common Voice language code: cs, pt, zh-CN, ...)"
[ -n "$data" ] || die "--data is required (the Common Voice release folder)"
[ -d "$data" ] || die "--data $data: no such folder"
[ -f "$here/conf/$mode.yaml" ] || die "--mode $mode: no $here/conf/$mode.yaml (choose finetune or frozen)"
PY=${PYTHON:-$root/.venv/bin/python}
out=${out:-$root/exp/commonvoice/$lang}
d=$out/data; run=$out/$(basename "$encoder")-$mode
step() { "$PY" "$here/steps.py" "$@"; }
on() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }
skip() { echo "stage $1: already done ($2 exists; delete it to redo)"; }
need_data() { [ -f "$d/prepared.json" ] || die "stage $1 needs the manifests in $d: run stage 1 first"; }
need_model() { [ -d "$run/model" ] || die "stage $1 needs the trained model in $run/model: run stage 2 first"; }
case $lm in
    none) lm_file="";;
    train) lm_file=$run/lm/train-${lm_order}gram.arpa;;
    *) lm_file=$lm;;
esac

if on 1; then
    if [ -f "$d/prepared.json" ]; then skip 1 "$d/prepared.json"; else
        echo "stage 1: Common Voice $lang manifests in $d"
        keep=(); if [ "$keep_mp3" = true ]; then keep=(--keep-mp3); fi
        step prepare --data "$data" --lang "$lang" --out "$d" --jobs "$jobs" "${keep[@]}"
    fi
fi
if on 2; then
    if [ -f "$run/train_summary.json" ]; then skip 2 "$run/train_summary.json"; else
        need_data 2
        echo "stage 2: training $encoder ($mode) in $run"
        "$PY" -m speechtl train "$here/conf/$mode.yaml" encoder="$encoder" out="$run" resume=true \
            train="$d/train.jsonl" dev="$d/dev.jsonl" normalizer="$(cat "$d/normalizer.json")" "${overrides[@]}"
    fi
fi
if on 3; then
    if [ -n "$lm_file" ] && [ ! -f "$lm_file" ]; then need_model 3; fi
    if [ -z "$lm_file" ]; then echo "stage 3: no LM (--lm none)"
    elif [ "$lm" != train ]; then [ -f "$lm_file" ] || die "--lm $lm: no such file"; echo "stage 3: LM $lm_file"
    elif [ -f "$lm_file" ]; then skip 3 "$lm_file"
    else
        echo "stage 3: ${lm_order}-gram LM of the training sentences in $lm_file"
        step lm --model "$run/model" --text "$d/train.jsonl" --order "$lm_order" --out "$lm_file"
    fi
fi
if on 4; then
    need_data 4; need_model 4
    echo "stage 4: scoring dev and test in $run/decode"
    lm_args=()
    if [ -n "$lm_file" ]; then lm_args=(--lm "$lm_file" --beam-width "$beam_width"); fi
    if [ -n "$lm_file" ] && [ "$tune_lm" = true ]; then lm_args+=(--tune-on dev); fi
    step score --model "$run/model" --out "$run/decode" --set dev="$d/dev.jsonl" --set test="$d/test.jsonl" "${lm_args[@]}"
fi
if on 5; then
    need_data 5
    echo "stage 5: results"
    step report --run "$run" --data "$d" --title "Common Voice $lang"
fi
