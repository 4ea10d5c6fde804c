"""mode=seq2seq on a tiny random Whisper encoder-decoder: training (each part), the model
folder, evaluate and transcribe through speechtl.load and the CLI, resume, and the
errors a bad configuration gets before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import make_wav  # noqa: E402
from speechtl.data.manifest import Utterance, write_manifest  # noqa: E402
from speechtl.training.config import load_train_config  # noqa: E402

TEXTS = ["ahoj", "dobry den", "ano", "ne", "mozna zitra", "dekuji", "prosim", "nashledanou"]


def make_tiny_whisper(out: Path) -> Path:
    """A random-init Whisper encoder-decoder with a byte-level tokenizer that has Whisper's
    special tokens and three language tokens (en, ro, cs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizerFast

    from speechtl.encoders.whisper import tiny_whisper_config

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    fast = WhisperTokenizerFast(tokenizer_object=tok, unk_token=eot, bos_token=eot, eos_token=eot, pad_token=eot)
    fast.add_special_tokens({"additional_special_tokens": [
        "<|startoftranscript|>", "<|en|>", "<|ro|>", "<|cs|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
        "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]})
    ids = fast.convert_tokens_to_ids
    torch.manual_seed(0)
    cfg = tiny_whisper_config(vocab_size=len(fast), pad_token_id=ids(eot), bos_token_id=ids(eot), eos_token_id=ids(eot),
                              decoder_start_token_id=ids("<|startoftranscript|>"), max_target_positions=64,
                              init_std=0.3,  # embeddings large enough that a frozen output layer can fit
                              begin_suppress_tokens=None)  # Whisper suppresses its id 220 (a lone space) first; ours is a byte
    WhisperForConditionalGeneration(cfg).save_pretrained(out)
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), fast).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    utts = []
    for i in range(24):
        text = TEXTS[i % len(TEXTS)]
        wav = make_wav(root / f"{i}.wav", 0.6 + 0.1 * (i % 5), freq=200 + 40 * (i % len(TEXTS)), seed=i)
        utts.append(Utterance(f"u{i}", str(wav), text, 0.6 + 0.1 * (i % 5), lang="cs"))
    return {"train": write_manifest(root / "train.jsonl", utts[:16]), "test": write_manifest(root / "test.jsonl", utts[16:]),
            "root": root}


def _cfg(tiny, corpus, out, **kw):
    base = {"mode": "seq2seq", "encoder": str(tiny), "train": str(corpus["train"]), "out": str(out), "max_steps": 40,
            "eval_every": 20, "encoder_lr": 3e-3, "lr": 3e-3, "warmup": 0.1, "max_batch_seconds": 8.0, "log_every": 5}
    return load_train_config(None, {**base, **kw})


@pytest.mark.parametrize("part", ["decoder", "lora", "lora_decoder", "full"])
def test_train_each_part_lowers_loss_and_reloads(tiny_whisper, corpus, tmp_path, part):
    from safetensors import safe_open

    from speechtl import load
    from speechtl.training.train import train

    lr = {"lr": 3e-2} if part.startswith("lora") else {}  # LoRA starts from a zero update
    summary = train(_cfg(tiny_whisper, corpus, tmp_path / part, seq2seq_train=part, max_steps=30, eval_every=30, **lr),
                    progress=False)
    assert summary["steps"] == 30 and summary["seq2seq_train"] == part
    assert summary["dev_carved_from_train"] == 4  # no dev given: 4 of the 16 clips held out
    rows = [r for r in (tmp_path / part / "metrics.csv").read_text().splitlines()[1:] if r.split(",")[1]]
    losses = [float(r.split(",")[1]) for r in rows]
    assert losses[-1] < 0.7 * losses[0], losses
    rec = load(summary["model_dir"])
    assert rec.language == "cs"
    if part.startswith("lora"):
        assert (Path(summary["model_dir"]) / "lora" / "adapter_config.json").is_file()
        with safe_open(str(Path(summary["model_dir"]) / "lora" / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert any(".decoder.layers." in k for k in keys)
        # lora_decoder leaves the encoder as it is; lora adapts both halves
        assert any(".encoder.layers." in k for k in keys) == (part == "lora"), keys[:4]
    from speechtl.data.manifest import read_manifest

    res = rec.evaluate(read_manifest(corpus["test"]))
    assert set(res) >= {"wer", "cer", "utterances", "audio_seconds", "looping", "hallucinated"}
    assert res["utterances"] == 8


def test_a_lora_model_in_training_gives_its_beams(tiny_whisper, corpus, tmp_path):
    """The N-best of hybrid decoding's dev choice, from a peft-wrapped (LoRA) model."""
    from speechtl.models import seq2seq as s2s
    from speechtl.training import seq2seq as trainer

    run = trainer._build(_cfg(tiny_whisper, corpus, tmp_path / "l", seq2seq_train="lora_decoder"), progress=False)
    assert hasattr(run.model, "peft_config")
    nbest = s2s.generate(run.model, run.processor.tokenizer, trainer._dev_hidden(run, [0, 1]), run.dev.samples[:2],
                         run.lang, 2, with_confidence=True, nbest=True)
    assert [len(n) for n in nbest] == [2, 2] and all(isinstance(t, str) and 0 <= c <= 1 for n in nbest for t, c in n)


@pytest.mark.parametrize("part", ["full", "lora"])
def test_dev_scores_use_the_trained_encoder(tiny_whisper, corpus, tmp_path, part):
    """Where the encoder trains, dev clips go through the current encoder, not the outputs
    it gave before training."""
    from speechtl.data.audio import load_audio
    from speechtl.models import seq2seq as s2s
    from speechtl.training import seq2seq as trainer

    run = trainer._build(_cfg(tiny_whisper, corpus, tmp_path / part, seq2seq_train=part), progress=False)
    run.model.eval()  # as dev scoring has it: no dropout
    before = trainer._dev_hidden(run, [0])[0].clone()
    with torch.no_grad():  # what some updates would do to the encoder
        for name, p in run.model.named_parameters():
            if ".encoder.layers." in name and p.requires_grad:
                p.add_(0.5)
    now = trainer._dev_hidden(run, [0])[0]
    fresh = s2s.encode(run.model, run.processor, [load_audio(run.dev.utts[0].audio)], run.device)[0]
    assert not torch.allclose(now, before, atol=1e-3)
    assert torch.allclose(now, fresh.detach(), atol=1e-5)


def test_decoder_training_learns_the_texts(tiny_whisper, corpus, tmp_path):
    """Each tone stands for one text; after training the model writes them (CER well below
    the untrained model's)."""
    from speechtl import load
    from speechtl.data.manifest import read_manifest
    from speechtl.training.train import train

    cfg = _cfg(tiny_whisper, corpus, tmp_path / "r", max_steps=150, eval_every=50, dev=str(corpus["test"]))
    summary = train(cfg, progress=False)
    assert summary["dev_before"]["cer"] > 0.8
    res = load(summary["model_dir"]).evaluate(read_manifest(corpus["train"]))
    assert res["cer"] < 0.5 * summary["dev_before"]["cer"], res


def test_transcribe_cli_json_and_long_audio(tiny_whisper, corpus, tmp_path):
    from speechtl.training.train import train

    summary = train(_cfg(tiny_whisper, corpus, tmp_path / "run", max_steps=5, eval_every=5), progress=False)
    long = make_wav(tmp_path / "long.wav", 65.0)
    out = subprocess.run([sys.executable, "-m", "speechtl", "transcribe", summary["model_dir"], str(long),
                          str(corpus["root"] / "0.wav"), "--format", "json", "--vad", "off", "-q"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    results = [json.loads(line) for line in out.stdout.splitlines()]
    by_path = {Path(r["path"]).name: r for r in results}
    segs = by_path["long.wav"]["segments"]
    assert [s["start"] for s in segs] == [0.0, 30.0, 60.0][: len(segs)] and segs[-1]["end"] <= 65.0
    assert by_path["0.wav"]["duration"] == pytest.approx(0.6)
    # cut at pauses (VAD, the default): every piece within Whisper's window, the recording's length kept
    out = subprocess.run([sys.executable, "-m", "speechtl", "transcribe", summary["model_dir"], str(long), "--format", "json",
                          "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cut = json.loads(out.stdout)
    assert cut["duration"] == pytest.approx(65.0) and all(0 <= s["end"] - s["start"] <= 30.0 for s in cut["segments"])
    with pytest.raises(ValueError, match="n-gram LM"):
        from speechtl import load

        load(summary["model_dir"]).transcribe(str(long), lm="x.arpa")


def test_ctc_weight_flag_needs_a_ctc_head(tiny_whisper, corpus, tmp_path, capsys):
    from speechtl.cli.app import main
    from speechtl.training.train import train

    summary = train(_cfg(tiny_whisper, corpus, tmp_path / "run", max_steps=2, eval_every=2), progress=False)
    assert main(["transcribe", summary["model_dir"], str(corpus["root"] / "0.wav"), "--ctc-weight", "0.5", "-q"]) == 1
    err = capsys.readouterr().err
    assert "--ctc-weight" in err and "no CTC head" in err, err


@pytest.mark.parametrize("ctc", [False, True])
def test_resume_continues_from_the_checkpoint(tiny_whisper, corpus, tmp_path, ctc):
    from speechtl.training.train import TrainingInterrupted, train

    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tiny_whisper, corpus, out, max_steps=20, eval_every=10, seq2seq_ctc=ctc), progress=False,
              should_stop=lambda step: step == 10)
    if ctc:  # the checkpoint keeps the head's own best, readable with weights_only=True
        assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["ctc_best"]["step"] == 10
    summary = train(_cfg(tiny_whisper, corpus, out, max_steps=20, eval_every=10, resume=True, seq2seq_ctc=ctc),
                    progress=False)
    assert summary["steps"] == 20
    if ctc:  # the head's own best on dev came back with the checkpoint
        assert summary["ctc"]["head_step"] in (10, 20)
    steps = [int(r.split(",")[0]) for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 20


def test_bad_configurations_fail_before_any_work(tiny_whisper, corpus, tmp_path):
    from speechtl.training.train import train

    enc = tmp_path / "enc_only"
    with pytest.raises(ValueError, match="not used by mode=seq2seq"):
        _cfg(tiny_whisper, corpus, tmp_path / "a", vocab="v.json")
    with pytest.raises(ValueError, match="seq2seq_train"):
        load_train_config(None, {"train": str(corpus["train"]), "seq2seq_train": "lora"})
    with pytest.raises(ValueError, match="seq2seq_train"):
        _cfg(tiny_whisper, corpus, tmp_path / "a", seq2seq_train="everything")
    # a wav2vec2-family encoder (the bundled first-generation layout) and an encoder without its decoder
    (enc).mkdir()
    (enc / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(ValueError, match="Whisper encoder-decoder"):
        train(_cfg(enc, corpus, tmp_path / "b"), progress=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="without its decoder"):
        train(_cfg("default", corpus, tmp_path / "c"), progress=False)
    with pytest.raises(ValueError, match="Whisper has no language"):
        train(_cfg(tiny_whisper, corpus, tmp_path / "d", lang="xx"), progress=False)
    assert not (tmp_path / "d").exists()


def _unlabelled(path: Path, utts_manifest: Path) -> Path:
    rows = [json.loads(line) for line in utts_manifest.read_text().splitlines()]
    for r in rows:
        r["audio"] = str(utts_manifest.parent / r["audio"])
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "text"}) + "\n" for r in rows))
    return path


def test_self_training_labels_the_unlabelled_audio_and_trains_on(tiny_whisper, corpus, tmp_path):
    from speechtl.training.train import train

    unl = _unlabelled(tmp_path / "unl.jsonl", corpus["test"])
    summary = train(_cfg(tiny_whisper, corpus, tmp_path / "run", max_steps=10, eval_every=10, unlabelled=str(unl),
                         pseudo_min_confidence=0.0), progress=False)
    assert summary["self_train_rounds"] == 1 and summary["steps"] == 20
    assert summary["pseudo_labelled"] == 8
    # empty or looping transcripts are never kept, whatever the confidence
    assert 0 <= summary["pseudo_kept"] <= 8
    assert (tmp_path / "run" / "model_labelled" / "speechtl.json").is_file()
    strict = train(_cfg(tiny_whisper, corpus, tmp_path / "strict", max_steps=5, eval_every=5, unlabelled=str(unl),
                        pseudo_min_confidence=1.0), progress=False)
    assert strict["pseudo_kept"] == 0  # no random model is sure of anything


def test_pseudo_labelling_stops_at_its_time_budget(tiny_whisper, corpus, tmp_path, monkeypatch):
    """pseudo_label_max_minutes: labelling stops once the budget has passed; the clips
    labelled are a random part of the unlabelled ones, not the manifest's first."""
    from speechtl.training import seq2seq as trainer
    from speechtl.training.train import train

    rows = [json.loads(line) for line in corpus["train"].read_text().splitlines()]  # 16 clips: two batches
    unl = tmp_path / "unl.jsonl"
    unl.write_text("".join(json.dumps({"id": r["id"], "audio": str(corpus["train"].parent / r["audio"]),
                                       "duration": r["duration"]}) + "\n" for r in rows))
    clock = iter(range(0, 10_000, 40))  # every reading of the clock is 40 s after the last
    monkeypatch.setattr(trainer, "_clock", lambda: float(next(clock)))
    summary = train(_cfg(tiny_whisper, corpus, tmp_path / "run", max_steps=2, eval_every=2, unlabelled=str(unl),
                         pseudo_min_confidence=0.0, pseudo_label_max_minutes=1.0), progress=False)
    assert summary["unlabelled_clips"] == 16 and summary["pseudo_labelled"] == 8  # the second batch came after 80 s
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    ids = [i for i, _, _ in ck["state"]["pseudo"]]
    assert len(set(ids)) == 8 and set(ids) <= {r["id"] for r in rows}
    with pytest.raises(ValueError, match="pseudo_label_max_minutes"):
        load_train_config(None, {"train": str(corpus["train"]), "pseudo_label_max_minutes": 5})


def test_bad_unlabelled_manifests_fail_before_any_work(tiny_whisper, corpus, tmp_path):
    from speechtl.data.manifest import ManifestError
    from speechtl.training.train import train

    with pytest.raises(ManifestError, match="unlabelled manifest has no 'text'"):
        train(_cfg(tiny_whisper, corpus, tmp_path / "a", unlabelled=str(corpus["train"])), progress=False)
    assert not (tmp_path / "a").exists()
    long = make_wav(tmp_path / "long.wav", 31.0)
    (tmp_path / "long.jsonl").write_text(json.dumps({"id": "l", "audio": str(long), "duration": 31.0}) + "\n")
    with pytest.raises(ValueError, match="longer than Whisper's 30 s"):
        train(_cfg(tiny_whisper, corpus, tmp_path / "b", unlabelled=str(tmp_path / "long.jsonl")), progress=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="config key 'unlabelled'"):
        load_train_config(None, {"train": str(corpus["train"]), "unlabelled": str(tmp_path / "long.jsonl")})


def test_carved_dev_set_shares_no_text_with_training():
    from speechtl.training.data import carve_dev

    utts = [Utterance(f"u{i}", f"/a/{i}.wav", TEXTS[i % 5].upper() if i % 2 else TEXTS[i % 5], 1.0) for i in range(40)]
    train, dev = carve_dev(utts, 0.1, seed=3)
    assert len(dev) >= 4 and len(train) + len(dev) == 40
    assert not {u.text.lower() for u in train} & {u.text.lower() for u in dev}
    assert carve_dev(utts, 0.1, seed=3) == (train, dev)  # the same split every time
    with pytest.raises(ValueError, match="too few"):
        carve_dev(utts[:6], 0.1, seed=0)


def test_the_unadapted_model_is_kept_when_no_update_beats_it_on_dev(tiny_whisper, corpus, tmp_path, monkeypatch, caplog):
    """Dev scores worse after every update than before any: the model folder holds the
    unadapted weights and says it kept update 0; scores that improve keep a later update."""
    from safetensors.torch import load_file

    from speechtl.training import seq2seq as trainer
    from speechtl.training.train import train

    real = trainer._score_dev
    calls = []

    def worse_after_training(*a, **kw):
        r = real(*a, **kw)
        calls.append(r)
        return r if len(calls) == 1 else {**r, "wer": 5.0, "cer": 5.0}

    monkeypatch.setattr(trainer, "_score_dev", worse_after_training)
    with caplog.at_level("WARNING"):
        summary = train(_cfg(tiny_whisper, corpus, tmp_path / "kept", max_steps=20, eval_every=10, patience=0),
                        progress=False)
    assert summary["steps"] == 20 and summary["best_step"] == 0 and len(calls) == 3
    assert summary["best_dev_cer"] == calls[0]["cer"] < 5.0
    assert "no update beat the unadapted model" in caplog.text
    kept = load_file(Path(summary["model_dir"]) / "whisper" / "model.safetensors")
    base = load_file(tiny_whisper / "model.safetensors")
    assert len(set(kept) & set(base)) == len(base)
    assert all(torch.equal(kept[k], base[k]) for k in base)
    last = torch.load(tmp_path / "kept" / "checkpoints" / "last.pt", weights_only=True)["trainable"]
    assert len(set(last) & set(base)) > 10
    assert any(not torch.equal(v, base[k]) for k, v in last.items() if k in base)  # training did move the weights

    calls.clear()
    monkeypatch.setattr(trainer, "_score_dev", lambda *a, **kw: (calls.append(1), {"wer": 1.0 / len(calls),
                                                                                  "cer": 1.0 / len(calls), "looping": 0})[1])
    summary = train(_cfg(tiny_whisper, corpus, tmp_path / "moved", max_steps=20, eval_every=10), progress=False)
    assert summary["best_step"] == 20


def test_adapt_recipe_chooses_by_encoder_and_leaves_a_model(tiny_whisper, corpus, tmp_path):
    """recipes/transfer/adapt.sh: a Whisper with its decoder gets mode=seq2seq (with
    self-training when unlabelled audio is given), another encoder the frozen CTC recipe;
    both leave DIR/model for evaluate, and say what they chose. Bad options fail first."""
    import os

    from conftest import tiny_encoder_dir
    from speechtl.data.manifest import read_manifest

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    train_m = tmp_path / "train.jsonl"  # absolute audio paths: the recipe runs from anywhere
    train_m.write_text("".join(json.dumps({**json.loads(line), "audio": str(corpus["root"] / json.loads(line)["audio"])})
                               + "\n" for line in corpus["train"].read_text().splitlines()))
    unl = _unlabelled(tmp_path / "unl.jsonl", corpus["test"])

    def adapt(*args):
        return subprocess.run(["bash", str(root / "recipes/transfer/adapt.sh"), "--lang", "cs", "--train", str(train_m),
                               *args], capture_output=True, text=True, env=env, timeout=300)

    r = adapt("--encoder", str(tiny_whisper), "--unlabelled", str(unl), "--out", str(tmp_path / "s"), "--steps", "4",
              "eval_every=2", "lr=3e-2", "pseudo_min_confidence=0.0")
    assert r.returncode == 0, r.stderr
    assert "mode=seq2seq" in r.stdout and "self-training" in r.stdout and "seq2seq_train=lora" in r.stdout
    assert "seq2seq_window=clip" in r.stdout
    summary = json.loads((tmp_path / "s" / "train_summary.json").read_text())
    assert summary["mode"] == "seq2seq" and summary["self_train_rounds"] == 1 and summary["pseudo_labelled"] == 8
    assert summary["seq2seq_train"] == "lora"
    assert "seq2seq_beam_width=4" in r.stdout and summary["beams"]["tried"] == 4
    beams = (summary["average"] if summary.get("adapt_kept") == "average" else summary)["beams"]  # the kept model's
    assert ((tmp_path / "s" / "model" / "decoding.json").is_file()) == (beams["beam_width"] == 4)
    assert summary["average"]["steps"] == [4, 6, 8] and "the mean of updates 4, 6, 8 reads dev CER" in r.stdout
    kept = "average" if summary.get("adapt_kept") == "average" else "single"
    assert (summary["average"]["dev_cer"] <= summary["best_dev_cer"]) == (kept == "average")
    meta = json.loads((tmp_path / "s" / "model" / "speechtl.json").read_text())
    assert ("averaged_steps" in meta) == (kept == "average")
    assert meta["window"] == "clip" and (tmp_path / "s" / "model" / "lora" / "adapter_config.json").is_file()
    from speechtl import load

    assert load(tmp_path / "s" / "model").evaluate(read_manifest(corpus["test"]))["utterances"] == 8

    enc = tiny_encoder_dir(tmp_path, "wav2vec2")
    r = adapt("--encoder", str(enc), "--out", str(tmp_path / "f"), "--steps", "2", "eval_every=2", "bilstm_hidden=8",
              "bilstm_layers=1", "num_workers=0", "mask_time_prob=0.0", "mask_feature_prob=0.0", "lm=none")
    assert r.returncode == 0, r.stderr
    assert "mode=frozen" in r.stdout
    assert json.loads((tmp_path / "f" / "train_summary.json").read_text())["mode"] == "frozen"
    assert (tmp_path / "f" / "model" / "speechtl.json").is_file()

    r = adapt("--out", str(tmp_path / "x"), "--unlabelled", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "--unlabelled" in r.stderr and "no such manifest" in r.stderr
    assert not (tmp_path / "x").exists()


def test_seq2seq_tensorboard_events_match_metrics_csv(tiny_whisper, corpus, tmp_path):
    import csv

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from speechtl.training.train import train

    out = tmp_path / "tb"
    train(_cfg(tiny_whisper, corpus, out, max_steps=10, eval_every=5, log_every=5, log="csv,tensorboard"), progress=False)
    rows = list(csv.DictReader(open(out / "metrics.csv", newline="")))
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [int(r["step"]) for r in rows] == [5, 10]
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    assert [e.value for e in acc.Scalars("dev/cer")] == pytest.approx([float(r["dev_cer"]) for r in rows], rel=1e-6)
    assert [e.value for e in acc.Scalars("lr/decoder")] == pytest.approx([float(r["lr"]) for r in rows], rel=1e-6)


def test_average_last_writes_the_mean_of_the_last_evaluations(tiny_whisper, corpus, tmp_path):
    """average_last=K: the last K evaluations' trainable weights are kept on disk, their
    mean is scored on dev and written to out/model_avg; out/model keeps the best update."""
    from safetensors.torch import load_file

    from speechtl import load
    from speechtl.data.manifest import read_manifest
    from speechtl.training.train import train

    out = tmp_path / "avg"
    summary = train(_cfg(tiny_whisper, corpus, out, max_steps=30, eval_every=10, average_last=2), progress=False)
    avg = summary["average"]
    assert avg["steps"] == [20, 30] and set(avg) >= {"dev_cer", "dev_wer", "model_dir"}
    snaps = sorted((out / "checkpoints").glob("eval-*.safetensors"))
    assert [p.name for p in snaps] == ["eval-00000020.safetensors", "eval-00000030.safetensors"]
    a, b = (load_file(p) for p in snaps)
    written = load_file(out / "model_avg" / "whisper" / "model.safetensors")
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert moved  # the two evaluations differ, so the mean is neither of them
    for k in moved:
        assert torch.allclose(written[k], (a[k].double() + b[k].double()).div(2).float(), atol=1e-6)
    meta = json.loads((out / "model_avg" / "speechtl.json").read_text())
    assert meta["averaged_steps"] == [20, 30]
    best = load_file(out / "model" / "whisper" / "model.safetensors")
    assert not all(torch.allclose(best[k], written[k]) for k in moved)  # out/model is not the mean
    assert load(out / "model_avg").evaluate(read_manifest(corpus["test"]))["utterances"] == 8
    assert json.loads((out / "train_summary.json").read_text())["average"]["steps"] == [20, 30]


def test_ctc_companion_trains_beside_the_decoder_and_is_saved(tiny_whisper, corpus, tmp_path):
    """seq2seq_ctc=true: a CTC head learns the texts from the same encoder outputs; its
    weight is chosen on dev among 'off' and the fixed weights; the folder keeps it."""
    from speechtl import load
    from speechtl.data.manifest import read_manifest
    from speechtl.models.seq2seq_ctc import WEIGHTS, Companion
    from speechtl.training.train import train

    out = tmp_path / "hy"
    summary = train(_cfg(tiny_whisper, corpus, out, max_steps=120, eval_every=60, dev=str(corpus["test"]),
                         seq2seq_ctc=True, lr=1e-2), progress=False)
    ctc = summary["ctc"]
    assert set(ctc["tried"]) == {"off", *map(str, WEIGHTS)}
    assert ctc["dev_cer_ctc_alone"] < 0.75, ctc  # the head learned (an untrained one writes nothing or noise: about 1)
    assert ctc["head_step"] in (60, 120)  # decoder mode: the head keeps its own best update
    chosen = "off" if ctc["weight"] is None else str(ctc["weight"])
    assert ctc["tried"][chosen]["dev_cer"] == min(v["dev_cer"] for v in ctc["tried"].values())
    model = Path(summary["model_dir"])
    assert {p.name for p in (model / "ctc").iterdir()} == {"head.safetensors", "vocab.json", "config.json"}
    assert json.loads((model / "speechtl.json").read_text())["ctc_weight"] == ctc["weight"]
    comp = Companion.load(model)
    assert set(comp.vocab.tokens[3:]) == set("".join(TEXTS).replace(" ", ""))
    rec = load(model)
    res = rec.evaluate(read_manifest(corpus["test"]))
    assert res["utterances"] == 8
    if ctc["weight"] is not None:
        assert res["ctc_weight"] == ctc["weight"] and "ctc_chosen" in res
    # --ctc-weight over the folder's weight: a number, or off (the decoder alone)
    from speechtl.cli.app import main

    for flag, want in (("0.9", 0.9), ("off", None)):
        assert main(["evaluate", str(model), str(corpus["test"]), "--ctc-weight", flag, "--json",
                     str(tmp_path / f"{flag}.json"), "-q"]) == 0
        got = json.loads((tmp_path / f"{flag}.json").read_text())
        assert got.get("ctc_weight") == want
        assert got["decoder"] == "whisper greedy" + ("" if want is None else " + CTC (hybrid)")
    with pytest.raises(SystemExit):
        main(["evaluate", str(model), str(corpus["test"]), "--ctc-weight", "1.5", "-q"])


def test_hybrid_decoding_replaces_a_looping_hypothesis(tiny_whisper, corpus, tmp_path, monkeypatch):
    """A decoder that loops: the CTC candidate needs no more characters than the clip has
    frames, so the joint score takes it instead; with ctc_weight=None the loop stays."""
    from speechtl import load
    from speechtl.data.manifest import read_manifest
    from speechtl.models import seq2seq as s2s
    from speechtl.training.train import train

    summary = train(_cfg(tiny_whisper, corpus, tmp_path / "hy", max_steps=120, eval_every=120,
                         dev=str(corpus["test"]), seq2seq_ctc=True, lr=1e-2), progress=False)
    rec = load(summary["model_dir"])
    rec.ctc_weight = 0.3
    loop = " ".join(["nashledanou"] * 12)

    def looping_generate(model, tokenizer, hidden, samples, lang, num_beams=1, with_confidence=False, nbest=False):
        if nbest:
            return [[(loop, 0.9)] * num_beams for _ in hidden]
        return [(loop, 0.9)] * len(hidden) if with_confidence else [loop] * len(hidden)

    monkeypatch.setattr(s2s, "generate", looping_generate)
    test = read_manifest(corpus["test"])
    hybrid = rec.evaluate(test)
    assert hybrid["ctc_chosen"] == 8 and hybrid["looping"] == 0 and hybrid["decoder"] == "whisper greedy + CTC (hybrid)"
    rec.ctc_weight = None
    alone = rec.evaluate(test)
    assert alone["looping"] == 8 and "ctc_chosen" not in alone
    assert hybrid["cer"] < 0.5 * alone["cer"], (hybrid["cer"], alone["cer"])
    assert hybrid["cer"] < 0.9, hybrid  # the CTC texts are words, not nothing (empty output reads 1.0)


def test_beam_width_is_chosen_on_dev_and_kept_in_the_folder(tiny_whisper, corpus, tmp_path, monkeypatch):
    """seq2seq_beam_width=2: beams are scored on dev against greedy at the end; where they
    read lower, the folder's decoding.json says so and evaluate decodes with them. The CTC
    head learns at seq2seq_ctc_lr."""
    from speechtl import load
    from speechtl.data.manifest import read_manifest
    from speechtl.training import seq2seq as trainer
    from speechtl.training.train import train

    cfg = _cfg(tiny_whisper, corpus, tmp_path / "b", max_steps=4, eval_every=2, dev=str(corpus["test"]),
               seq2seq_beam_width=2, seq2seq_ctc=True, seq2seq_ctc_lr=0.02)
    run = trainer._build(cfg, progress=False)
    assert [g["initial_lr"] for g in run.opt.param_groups] == [cfg.encoder_lr, 0.02]
    real, widths = trainer._score_dev, []

    def beams_read_better(run, num_beams=1):  # whatever the tiny model writes
        widths.append(num_beams)
        return real(run, num_beams) | {"cer": 0.1 if num_beams > 1 else 0.2}

    monkeypatch.setattr(trainer, "_score_dev", beams_read_better)
    summary = train(cfg, progress=False)
    assert summary["beams"] == {"beam_width": 2, "dev_cer_greedy": 0.2, "dev_cer_beams": 0.1, "tried": 2}
    assert 2 in widths
    record = json.loads((Path(summary["model_dir"]) / "decoding.json").read_text())
    assert record["decoder"] == "beam" and record["beam_width"] == 2
    rec = load(summary["model_dir"])
    assert rec.default_options.beam_width == 2
    res = rec.evaluate(read_manifest(corpus["test"]))
    assert res["beam_width"] == 2 and res["decoder"].startswith("whisper beam")
    # greedy where beams read worse: no record, greedy decoding
    monkeypatch.setattr(trainer, "_score_dev", lambda run, num_beams=1: real(run, num_beams) | {"cer": 0.1 * num_beams})
    plain = train(_cfg(tiny_whisper, corpus, tmp_path / "g", max_steps=2, eval_every=2, dev=str(corpus["test"]),
                       seq2seq_beam_width=2), progress=False)
    assert plain["beams"]["beam_width"] == 1 and not (Path(plain["model_dir"]) / "decoding.json").exists()
    with pytest.raises(ValueError, match="seq2seq_beam_width"):
        load_train_config(None, {"train": str(corpus["train"]), "seq2seq_beam_width": 4})


def test_candidates_pick_by_the_joint_score():
    from speechtl.models.seq2seq_ctc import Candidates

    inf = float("-inf")
    c = Candidates([["Ano.", "ano"], ["la la la la", "la lettre"], ["ne", "ano"]],
                   [[(-1.0, -1.0), (-1.0, -9.0)], [(inf, -2.0), (-5.0, -8.0)], [(-4.0, -1.0), (-3.0, -6.0)]],
                   [0, None, None], [0.9, 0.8, 0.7])
    assert c.attention == ["Ano.", "la la la la", "ne"] and c.ctc == ["ano", "la lettre", "ano"]
    assert c.pick(None) == [("Ano.", False), ("la la la la", False), ("ne", False)]
    # agreeing candidates keep the decoder's text; an impossible CTC score loses; otherwise the mix decides
    assert c.pick(0.3) == [("Ano.", False), ("la lettre", True), ("ne", False)]
    assert c.pick(0.9) == [("Ano.", False), ("la lettre", True), ("ano", True)]
    # beams: a later beam the CTC head prefers wins over the best beam and over the CTC text itself
    nb = Candidates([["dobry den", "dobry dne", "dobri dne"]], [[(-9.0, -1.0), (-2.0, -1.5), (-1.0, -6.0)]], [None],
                    [0.5])
    assert nb.pick(None) == [("dobry den", False)]
    assert nb.pick(0.5) == [("dobry dne", False)] and nb.choice(0.5) == [1]
    assert nb.pick(0.9) == [("dobri dne", True)]


def test_hybrid_decoding_rescores_the_beams(tiny_whisper, corpus, tmp_path):
    """With beams, hybrid decoding picks among every beam and the CTC text: the written
    text is one of them, and at a CTC weight near 1 the CTC head's choice is a candidate
    with the best CTC score."""
    from speechtl import load
    from speechtl.data.manifest import read_manifest
    from speechtl.models import seq2seq as s2s
    from speechtl.models.seq2seq_ctc import candidates
    from speechtl.training.train import train

    summary = train(_cfg(tiny_whisper, corpus, tmp_path / "hy", max_steps=60, eval_every=60,
                         dev=str(corpus["test"]), seq2seq_ctc=True, lr=1e-2), progress=False)
    rec = load(summary["model_dir"])
    utts = read_manifest(corpus["test"])[:4]
    from speechtl.data.audio import load_audio

    wavs = [load_audio(u.audio) for u in utts]
    samples = [len(w) for w in wavs]
    hidden = s2s.encode(rec.model, rec.processor, wavs, rec.device)
    nbest = s2s.generate(rec.model, rec.processor.tokenizer, hidden, samples, rec.lang, 3, with_confidence=True,
                         nbest=True)
    assert [len(n) for n in nbest] == [3] * 4
    c = candidates(rec.model, rec.processor.tokenizer, rec.ctc, rec.normalizer, s2s.stack_hidden(hidden, samples),
                   samples, s2s.prefix_ids(rec.processor.tokenizer, rec.lang), [[t for t, _ in n] for n in nbest])
    assert all(len(t) == 4 for t in c.texts)
    for j, sc in zip(c.choice(0.999), c.scores):
        assert sc[j][0] == pytest.approx(max(x for x, _ in sc), abs=1e-3 * abs(sc[j][0]) + 1e-3)
    rec.ctc_weight = 0.5
    res = rec.evaluate(utts, out_dir=tmp_path / "ev", beam_width=3)
    assert res["beam_width"] == 3 and res["decoder"] == "whisper beam + CTC (hybrid)" and res["utterances"] == 4
    # each clip's text is its joint-score choice among the beams and the CTC text
    assert res["ctc_chosen"] == sum(j == len(t) - 1 for t, j in zip(c.texts, c.choice(0.5)))


def test_ctc_companion_bad_config_and_folder(tiny_whisper, corpus, tmp_path):
    from safetensors.torch import save_file

    from speechtl.models.seq2seq_ctc import Companion

    with pytest.raises(ValueError, match="seq2seq_ctc"):
        load_train_config(None, {"mode": "frozen", "train": str(corpus["train"]), "out": str(tmp_path / "x"),
                                 "seq2seq_ctc": True})
    summary = _train_small_hybrid(tiny_whisper, corpus, tmp_path / "m")
    head = Path(summary["model_dir"]) / "ctc" / "head.safetensors"
    save_file({"proj.weight": torch.zeros(3, 3)}, str(head))
    with pytest.raises(ValueError, match="head.safetensors"):
        Companion.load(summary["model_dir"])


def _train_small_hybrid(tiny, corpus, out):
    from speechtl.training.train import train

    return train(_cfg(tiny, corpus, out, max_steps=4, eval_every=4, seq2seq_ctc=True), progress=False)


def test_the_clip_window_runs_whispers_own_layers_on_fewer_frames(tiny_whisper):
    """``window="clip"``: the encoder runs on the longest clip plus the margin. Its forward,
    on the whole window, is transformers' own; on the cut window it gives one row a frame."""
    import numpy as np
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from speechtl.models import seq2seq as s2s

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper).eval()
    proc = WhisperProcessor.from_pretrained(tiny_whisper)
    rng = np.random.default_rng(0)
    wavs = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (8000, 24000)]  # 0.5 s and 1.5 s
    feats = proc.feature_extractor(wavs, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        whole = model.get_encoder()(feats).last_hidden_state
        assert torch.allclose(s2s.encode_frames(model.get_encoder(), feats), whole, atol=1e-5)
    full = s2s.encode(model, proc, wavs, "cpu")
    cut = s2s.encode(model, proc, wavs, "cpu", window="clip")
    frames = s2s.kept_frames(24000, model.config.max_source_positions)  # the longer clip: 1.5 s + 1 s margin
    assert frames == 125
    assert [h.shape for h in full] == [whole.shape[1:]] * 2
    assert [h.shape for h in cut] == [torch.Size([frames, model.config.d_model])] * 2
    with pytest.raises(ValueError, match="window 'tiny' is not one of 30, clip"):
        s2s.encode(model, proc, wavs, "cpu", window="tiny")


def test_lora_on_the_clip_window_trains_and_its_folder_decodes_the_same_way(tiny_whisper, corpus, tmp_path,
                                                                            monkeypatch):
    from speechtl import load
    from speechtl.data.manifest import read_manifest
    from speechtl.models import seq2seq as s2s
    from speechtl.training.train import train

    summary = train(_cfg(tiny_whisper, corpus, tmp_path / "w", seq2seq_train="lora", seq2seq_window="clip", lr=3e-2,
                         max_steps=30, eval_every=30), progress=False)
    rows = [r for r in (tmp_path / "w" / "metrics.csv").read_text().splitlines()[1:] if r.split(",")[1]]
    losses = [float(r.split(",")[1]) for r in rows]
    assert losses[-1] < 0.7 * losses[0], losses
    meta = json.loads((Path(summary["model_dir"]) / "speechtl.json").read_text())
    assert meta["window"] == "clip"
    rec = load(summary["model_dir"])
    seen = []
    real = s2s.encode

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append((kw.get("window"), out[0].shape[0]))
        return out

    monkeypatch.setattr(s2s, "encode", spy)
    res = rec.evaluate(read_manifest(corpus["test"]))
    assert res["utterances"] == 8
    # every batch on the cut window: at most 1.0 s clips plus the margin, 100 frames, not 1,500
    assert seen and all(w == "clip" and t <= 100 for w, t in seen), seen
    # a folder whose window is not one speechtl writes
    meta["window"] = "10"
    (Path(summary["model_dir"]) / "speechtl.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="window '10' is not one of 30, clip"):
        load(summary["model_dir"])


def test_the_clip_window_is_only_for_modes_that_train_the_encoder(tiny_whisper, corpus, tmp_path):
    from speechtl.training.config import parse_overrides

    assert parse_overrides(["seq2seq_window=30"]) == {"seq2seq_window": "30"}  # a string, as the key wants
    for part in ("decoder", "lora_decoder"):
        with pytest.raises(ValueError, match=f"'seq2seq_window': clip is for seq2seq_train=lora or full.*{part}"):
            _cfg(tiny_whisper, corpus, tmp_path / "a", seq2seq_train=part, seq2seq_window="clip")
    with pytest.raises(ValueError, match="'seq2seq_window': '10' is not one of 30, clip"):
        _cfg(tiny_whisper, corpus, tmp_path / "a", seq2seq_window="10")
    with pytest.raises(ValueError, match="'seq2seq_window': for mode=seq2seq"):
        load_train_config(None, {"train": str(corpus["train"]), "seq2seq_window": "clip"})
    assert not (tmp_path / "a").exists()


def test_a_runaway_pseudo_label_is_left_out_not_an_error_half_way(tiny_whisper, corpus, tmp_path, caplog):
    """A pseudo-label longer than the decoder's positions (a runaway transcript) is dropped
    with a log line; the others join the training set."""
    import logging

    from speechtl.training import seq2seq as trainer

    unl = _unlabelled(tmp_path / "unl.jsonl", corpus["test"])
    run = trainer._build(_cfg(tiny_whisper, corpus, tmp_path / "r", unlabelled=str(unl), pseudo_min_confidence=0.0),
                         progress=False)
    before = len(run.train.utts)
    ids = [u.id for u in run.unlabelled]
    runaway = " ".join(TEXTS * 3)  # 200 bytes against 64 positions, and no word repeated running (not a loop)
    labels = [[ids[0], runaway, 0.9], [ids[1], "ano", 0.9]]
    with caplog.at_level(logging.INFO, logger="speechtl.training.seq2seq"):
        assert trainer._add_pseudo(run, labels, progress=False) == 1
    assert len(run.train.utts) == before + 1 and run.train.utts[-1].id == ids[1]
    assert len(run.train.targets) == len(run.train.utts) == len(run.train.samples)
    assert "1 pseudo-label(s) longer than the decoder's 64 positions left out" in caplog.text
