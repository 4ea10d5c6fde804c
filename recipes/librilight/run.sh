#!/usr/bin/env bash
# Libri-light: the wav2vec 2.0 low-resource protocol. Fine-tune on 10 minutes, 1 hour or 10
# hours of labelled LibriSpeech (Libri-light's limited-resource sets) and score LibriSpeech
# dev-clean, dev-other, test-clean and test-other, greedy and with a 4-gram LM.
#   stage 0  the files in DATA: librispeech_finetuning.tgz, dev-clean.tar.gz, dev-other.tar.gz,
#            test-clean.tar.gz, test-other.tar.gz and, with --lm librispeech, 4-gram.arpa.gz;
#            each archive checked (--checksums FILE, else against the sha256 recorded in
#            DATA/SHA256SUMS the first time it was used) and extracted. --download fetches the
#            missing ones from their publishers (or --mirror URL); without it, a missing file is
#            an error that says what to fetch and where to put it
#   stage 1  manifests of the subset (10min: fold 1h/FOLD; 1h: 1h/; 10h: 1h/ and 9h/) and of the
#            four evaluation sets (OUT/SUBSET/data); missing or unreadable files and empty
#            transcripts are skipped and listed in SET.skipped.tsv
#   stage 2  speechtl train with conf/MODE.yaml, dev-other as the dev set
#            (RUN = OUT/SUBSET/ENCODER-MODE)
#   stage 3  the LM: LibriSpeech's official 4-gram, lower-cased like the model's transcripts
#            (--lm librispeech), a 4-gram of the training transcripts (--lm train), an ARPA
#            file of yours (--lm FILE.arpa) or none (--lm none)
#   stage 4  WER/CER on the four sets, greedy and with the LM (beam search; the LM weight and word
#            bonus chosen on dev-other unless --tune-lm false), into RUN/decode/SET[-lm]/
#   stage 5  the results table beside the wav2vec 2.0 paper's, printed and written to
#            RUN/results.md and RUN/results.json
# A stage whose output exists is skipped, so the script can be rerun after an interruption
# (training resumes from its last checkpoint); delete a stage's output to redo it.
# Usage: recipes/librilight/run.sh --subset 10min|1h|10h --data DIR [--download] [--encoder E]
#            [--mode finetune|frozen] [--fold 0] [--out DIR] [--stage N] [--stop-stage N]
#            [--lm librispeech|train|none|FILE.arpa] [--beam-width 32] [--tune-lm true|false]
#            [--checksums FILE] [--mirror URL] [key=value ...]   (key=value goes to `speechtl train`)
#   Defaults: --encoder facebook/wav2vec2-base --mode finetune --out exp/librilight
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
subset=""; data=""; download=false; encoder=facebook/wav2vec2-base; mode=finetune; fold=0; out=""
stage=0; stop_stage=5; lm=librispeech; beam_width=32; tune_lm=true; checksums=""; mirror=""
# a bare --download means --download true
args=()
while [ $# -gt 0 ]; do
    args+=("$1")
    if [ "$1" = --download ] && { [ $# -lt 2 ] || [[ $2 != true && $2 != false ]]; }; then args+=(true); fi
    shift
done
set -- "${args[@]}"
. "$here/../parse_options.sh"
die() { echo "$0: $*" >&2; exit 1; }
case $subset in 10min|1h|10h) ;; "") die "--subset is required: 10min, 1h or 10h";; *) die "--subset $subset: expected 10min, 1h or 10h";; esac
[ -n "$data" ] || die "--data is required (the folder holding, or to hold, the downloaded files)"
[ -d "$data" ] || [ "$download" = true ] || die "--data $data: no such folder (add --download to fetch the files into it)"
[ -f "$here/conf/$mode.yaml" ] || die "--mode $mode: no $here/conf/$mode.yaml (choose finetune or frozen)"
PY=${PYTHON:-$root/.venv/bin/python}
out=${out:-$root/exp/librilight}
d=$out/$subset/data; run=$out/$subset/$(basename "$encoder")-$mode
step() { "$PY" "$here/steps.py" "$@"; }
on() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }
skip() { echo "stage $1: already done ($2 exists; delete it to redo)"; }
need_data() { [ -f "$d/prepared.json" ] || die "stage $1 needs the manifests in $d: run stage 1 first"; }
need_model() { [ -d "$run/model" ] || die "stage $1 needs the trained model in $run/model: run stage 2 first"; }
# what fairseq's base_10h.yaml changes from base_10m.yaml and base_1h.yaml
per_subset=()
if [ "$mode" = finetune ] && [ "$subset" = 10h ]; then per_subset=(max_steps=20000 mask_feature_prob=0.5 layerdrop=0.05); fi
case $lm in
    none) lm_file="";;
    train) lm_file=$run/lm/train-4gram.arpa;;
    librispeech) lm_file=$run/lm/librispeech-4gram.arpa;;
    *) lm_file=$lm;;
esac

if on 0; then
    echo "stage 0: files in $data"
    fetch=(--data "$data")
    if [ "$download" = true ]; then fetch+=(--download); fi
    if [ -n "$mirror" ]; then fetch+=(--mirror "$mirror"); fi
    if [ -n "$checksums" ]; then fetch+=(--checksums "$checksums"); fi
    if [ "$lm" = librispeech ]; then fetch+=(--with-lm); fi
    step fetch "${fetch[@]}"
fi
if on 1; then
    if [ -f "$d/prepared.json" ]; then skip 1 "$d/prepared.json"; else
        echo "stage 1: manifests of Libri-light $subset and the LibriSpeech dev and test sets in $d"
        step prepare --data "$data" --subset "$subset" --fold "$fold" --out "$d"
    fi
fi
if on 2; then
    if [ -f "$run/train_summary.json" ]; then skip 2 "$run/train_summary.json"; else
        need_data 2
        echo "stage 2: training $encoder ($mode) on $subset in $run"
        "$PY" -m speechtl train "$here/conf/$mode.yaml" encoder="$encoder" out="$run" resume=true \
            train="$d/train.jsonl" dev="$d/dev-other.jsonl" normalizer="$(cat "$d/normalizer.json")" \
            "${per_subset[@]}" "${overrides[@]}"
    fi
fi
if on 3; then
    if [ -n "$lm_file" ] && [ ! -f "$lm_file" ]; then need_model 3; fi
    if [ -z "$lm_file" ]; then echo "stage 3: no LM (--lm none)"
    elif [ "$lm" != train ] && [ "$lm" != librispeech ]; then
        [ -f "$lm_file" ] || die "--lm $lm: no such file"; echo "stage 3: LM $lm_file"
    elif [ -f "$lm_file" ]; then skip 3 "$lm_file"
    elif [ "$lm" = train ]; then
        echo "stage 3: 4-gram LM of the training transcripts in $lm_file"
        step lm --model "$run/model" --text "$d/train.jsonl" --order 4 --out "$lm_file"
    else
        echo "stage 3: LibriSpeech's 4-gram LM, cased for the model, in $lm_file"
        step lm --model "$run/model" --arpa "$data/4-gram.arpa.gz" --out "$lm_file"
    fi
fi
if on 4; then
    need_data 4; need_model 4
    echo "stage 4: scoring the LibriSpeech dev and test sets in $run/decode"
    sets=(); for s in dev-clean dev-other test-clean test-other; do sets+=(--set "$s=$d/$s.jsonl"); done
    lm_args=()
    if [ -n "$lm_file" ]; then lm_args=(--lm "$lm_file" --beam-width "$beam_width"); fi
    if [ -n "$lm_file" ] && [ "$tune_lm" = true ]; then lm_args+=(--tune-on dev-other); fi
    step score --model "$run/model" --out "$run/decode" "${sets[@]}" "${lm_args[@]}"
fi
if on 5; then
    need_data 5
    echo "stage 5: results"
    step report --run "$run" --data "$d" --subset "$subset"
fi
