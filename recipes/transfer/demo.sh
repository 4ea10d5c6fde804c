#!/usr/bin/env bash
# The README's main job, a few minutes on 2 CPU cores: does a pretrained encoder transfer
# to a language it was not adapted to?
#   1. synthesise a small Czech corpus with espeak-ng (train, and a test set spoken by
#      voice variants that are not in the training data)
#   2. adapt the encoder (--encoder; default: the bundled one) with a frozen-encoder
#      BiLSTM CTC head
#   3. train the same architecture from scratch for the same updates, capped at
#      SCRATCH_MINUTES (default 2) of wall time so the demo stays short
#   4. score both on the test set: the frozen model greedy and with the word LM its folder
#      carries (training builds it from the training text plus the language's 50,000 most
#      frequent words, and tunes its weights on a dev set held out from the training
#      clips); for a Whisper encoder, or whenever whisper-base has been fetched, also score
#      Whisper's own decoder unadapted (zero-shot) on the same test; print the table, then
#      transcribe one test sentence as `speechtl transcribe` does by default, from the
#      espeak-ng test voice and (for Czech, with festival installed) from festival's voice
# Nothing is selected on the test set.
# Usage: recipes/transfer/demo.sh [--encoder default|whisper-base|DIR] [--out DIR] [--lang LANG]
#            [--minutes M] [--steps N]
# whisper-base needs `bash tools/fetch_encoder.sh whisper-base` first (downloads ~140 MB once).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=""; lang=cs; minutes=5; steps=300; encoder=default
. "$here/../parse_options.sh"
out=${out:-$root/exp/demo-$(basename "$encoder")}
PY=${PYTHON:-$root/.venv/bin/python}
st() { "$PY" -m speechtl "$@"; }
mkdir -p "$out"
whisper=0
case $encoder in *whisper*) whisper=1;; esac
held_out=m7,f5,klatt3  # test voices: variants the training speakers never use
[ -f "$out/train/manifest.jsonl" ] || st synth --lang "$lang" --minutes "$minutes" --out "$out/train" --seed 1 --exclude-variants "$held_out" --prefix train- -q
[ -f "$out/test/manifest.jsonl" ] || st synth --lang "$lang" --minutes 1 --out "$out/test" --seed 9 --variants "$held_out" --speakers 6 --prefix test- -q
common=(train="$out/train/manifest.jsonl" max_steps="$steps" eval_every="$steps" seed=0 num_workers=0 overwrite=true -q)
# a smaller head than the full recipe's 384 x 2 keeps the demo inside its time budget
st train "$here/conf/frozen.yaml" encoder="$encoder" out="$out/frozen" bilstm_hidden=128 bilstm_layers=1 head_dropout=0.1 \
    lm_wordlist="$lang" "${common[@]}"
st train "$here/conf/scratch.yaml" encoder="$encoder" out="$out/scratch" max_minutes="${SCRATCH_MINUTES:-2}" lm=none "${common[@]}"
for m in frozen scratch; do st evaluate "$out/$m/model" "$out/test/manifest.jsonl" --greedy --out-dir "$out/$m/test" -q >/dev/null; done
st evaluate "$out/frozen/model" "$out/test/manifest.jsonl" --out-dir "$out/frozen/test-lm" -q >/dev/null  # its own decoding
# Whisper's own decoder unadapted, on the same test: the encoder's, or whisper-base's once fetched
zeroshot=""
if [ $whisper = 1 ]; then
    zeroshot=$encoder
elif "$PY" -c "from speechtl.encoders.registry import resolve_encoder as r; r('whisper-base')" 2>/dev/null; then
    zeroshot=whisper-base
fi
if [ -n "$zeroshot" ]; then
    st zeroshot "$zeroshot" "$out/test/manifest.jsonl" --language "$lang" --out-dir "$out/zeroshot" -q >/dev/null
fi
"$PY" - "$out" "$encoder" "$zeroshot" <<'PYEOF'
import json, os, sys
out, enc, zs = sys.argv[1], sys.argv[2], sys.argv[3]
name = os.path.basename(enc.rstrip("/")) if enc != "default" else "default encoder"
print(f"\n{'model':40s} {'steps':>6s} {'train s':>8s} {'test CER':>9s} {'test WER':>9s}")
rows = [("frozen", "test", f"{name}, frozen + BiLSTM head"), ("frozen", "test-lm", "  same, with its folder's word LM"),
        ("scratch", "test", "same model from scratch")]
for run, test, label in rows:
    s = json.load(open(f"{out}/{run}/train_summary.json"))
    t = json.load(open(f"{out}/{run}/{test}/summary.json"))
    if test == "test-lm" and t.get("decoder") != "beam":  # the LM lost to greedy on dev: the folder decodes greedily
        label = "  same, its folder's decoding (greedy)"
    print(f"{label:40s} {s['steps']:6d} {s['wall_time_s']:8.0f} {t['cer']:9.3f} {t['wer']:9.3f}")
if zs and os.path.exists(f"{out}/zeroshot/summary.json"):
    t = json.load(open(f"{out}/zeroshot/summary.json"))
    zs_name = os.path.basename(zs.rstrip("/"))
    print(f"{zs_name + ' zero-shot (its own decoder)':40s} {'-':>6s} {'-':>8s} {t['cer']:9.3f} {t['wer']:9.3f}")
PYEOF
wav=$(ls "$out"/test/wavs/*.wav | head -1)
ref=$(grep -h "\"$(basename "$wav" .wav)\"" "$out/test/manifest.jsonl" | "$PY" -c 'import json,sys; print(json.loads(sys.stdin.readline())["text"])')
echo; echo "reference:                          $ref"
echo "transcript, espeak-ng's test voice: $(st transcribe "$out/frozen/model" "$wav" -q)"
# the same sentence from another synthesiser: festival's Czech diphone voice (tools/setup.sh
# installs it); festival-czech reads ISO-8859-2
if [ "$lang" = cs ] && command -v text2wave >/dev/null && [ -d /usr/share/festival/voices/czech/czech_ph ]; then
    if printf '%s\n' "$ref" | iconv -f utf-8 -t iso-8859-2//TRANSLIT > "$out/festival.txt" \
        && text2wave -eval "(voice_czech_ph)" "$out/festival.txt" -o "$out/festival.wav" 2>"$out/festival.log"; then
        echo "transcript, festival's Czech voice: $(st transcribe "$out/frozen/model" "$out/festival.wav" -q)"
    else
        echo "festival could not speak the sentence (see $out/festival.log); the results above stand"
    fi
fi
