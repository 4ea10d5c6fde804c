#!/usr/bin/env bash
# The README's main job, a few minutes on 2 CPU cores: does the bundled default encoder
# transfer to a language it never heard?
#   1. synthesise a small Czech corpus with espeak-ng (train, and a test set spoken by
#      voice variants that are not in the training data)
#   2. adapt the default encoder with a frozen-encoder BiLSTM CTC head
#   3. train the same architecture from scratch for the same updates, capped at
#      SCRATCH_MINUTES (default 2) of wall time so the demo stays short
#   4. score both on the test set, print test CER/WER, then transcribe one file
# Nothing is selected on the test set: each model is the one left after its last update.
# Usage: recipes/transfer/demo.sh [--out DIR] [--lang LANG] [--minutes M] [--steps N]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/exp/demo; lang=cs; minutes=5; steps=300
. "$here/../parse_options.sh"
PY=${PYTHON:-$root/.venv/bin/python}
st() { "$PY" -m speechtl "$@"; }
mkdir -p "$out"
held_out=m7,f5,klatt3  # test voices: variants the training speakers never use
st synth --lang "$lang" --minutes "$minutes" --out "$out/train" --seed 1 --exclude-variants "$held_out" --prefix train- -q
st synth --lang "$lang" --minutes 1 --out "$out/test" --seed 9 --variants "$held_out" --speakers 6 --prefix test- -q
common=(train="$out/train/manifest.jsonl" max_steps="$steps" eval_every="$steps" seed=0 num_workers=0 -q)
# a smaller head than the full recipe's 256 x 2 keeps the demo inside its time budget
st train "$here/conf/frozen.yaml" encoder=default out="$out/frozen" bilstm_hidden=128 bilstm_layers=1 head_dropout=0.1 "${common[@]}"
st train "$here/conf/scratch.yaml" encoder=default out="$out/scratch" max_minutes="${SCRATCH_MINUTES:-2}" "${common[@]}"
for m in frozen scratch; do st evaluate "$out/$m/model" "$out/test/manifest.jsonl" --out-dir "$out/$m/test" -q >/dev/null; done
"$PY" - "$out" <<'PYEOF'
import json, sys
out = sys.argv[1]
print(f"\n{'model':28s} {'steps':>6s} {'train s':>8s} {'test CER':>9s} {'test WER':>9s}")
for name, label in (("frozen", "default encoder, frozen"), ("scratch", "same model from scratch")):
    s = json.load(open(f"{out}/{name}/train_summary.json"))
    t = json.load(open(f"{out}/{name}/test/summary.json"))
    print(f"{label:28s} {s['steps']:6d} {s['wall_time_s']:8.0f} {t['cer']:9.3f} {t['wer']:9.3f}")
PYEOF
wav=$(ls "$out"/test/wavs/*.wav | head -1)
echo; echo "reference:  $(grep -h "\"$(basename "$wav" .wav)\"" "$out/test/manifest.jsonl" | "$PY" -c 'import json,sys; print(json.loads(sys.stdin.readline())["text"])')"
echo "transcript: $(st transcribe "$out/frozen/model" "$wav" -q)"
