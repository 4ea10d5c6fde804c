"""ONNX export (`speechtl export --format onnx`) and the torch-free runtime that reads it."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_wav
from speechtl.cli.app import main
from speechtl.data.text import Normalizer, Vocabulary
from speechtl.inference.onnx import ARENA_KEEP_SECONDS, OnnxFolderError, OnnxRecognizer, is_onnx_dir
from speechtl.inference.recognizer import Recognizer
from speechtl.models.adapters import AdapterConfig
from speechtl.models.ctc import HeadConfig, build_model
from speechtl.models.model_dir import save_model_dir
from speechtl.models.onnx_export import ExportError, export_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

VOCAB = Vocabulary(["<pad>", "[UNK]", "|", *"abcdefgh"])


def _model_dir(root, encoder: str, mode: str, head: str = "linear", **kw):
    model = build_model(encoder, mode, len(VOCAB), HeadConfig(kind=head, hidden_size=16, num_layers=2), **kw)
    with torch.no_grad():  # a random head that speaks: varied, confident outputs to compare
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return save_model_dir(model, VOCAB, Normalizer(), root / f"{mode}-{head}")


@pytest.fixture(scope="module")
def whisper_frozen(tmp_path_factory):
    from transformers import WhisperForConditionalGeneration

    from speechtl.encoders.whisper import tiny_whisper_config

    root = tmp_path_factory.mktemp("onnx-whisper")
    torch.manual_seed(0)  # the same random encoder every run: tests read its transcripts
    WhisperForConditionalGeneration(tiny_whisper_config()).save_pretrained(str(root / "whisper"))
    return _model_dir(root, str(root / "whisper"), "frozen", "bilstm")


@pytest.fixture(scope="module")
def exported(whisper_frozen, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-out")
    return export_onnx(whisper_frozen, out / "fp32"), export_onnx(whisper_frozen, out / "int8", quantize="int8")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-audio")
    return [make_wav(root / f"c{k}.wav", s, freq=f) for k, (s, f) in enumerate([(1.7, 300.0), (0.9, 700.0), (2.6, 500.0)])]


def _same_transcripts(a, b, tol=1e-3):
    assert [t.text for t in a] == [t.text for t in b]
    for ta, tb in zip(a, b):
        assert [(w.word, w.start, w.end) for w in ta.words] == [(w.word, w.start, w.end) for w in tb.words]
        assert np.allclose([w.confidence for w in ta.words], [w.confidence for w in tb.words], atol=tol)


def test_the_folder_holds_what_sherpa_onnx_and_speechtl_read(exported):
    fp32, int8 = exported
    assert (fp32 / "model.onnx").is_file() and not (fp32 / "model.int8.onnx").exists()
    assert (int8 / "model.int8.onnx").is_file() and not (int8 / "model.onnx").exists()
    import onnx

    graph = onnx.load(str(int8 / "model.int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert "MatMulInteger" in ops and "DynamicQuantizeLinear" in ops  # the encoder's and head's products in int8
    mel = [n for n in graph.node if n.op_type == "MatMul" and any("mel_filters" in i for i in n.input)]
    assert len(mel) == 1  # the mel filter bank stays in float
    lines = (fp32 / "tokens.txt").read_text().splitlines()
    assert lines[:3] == ["<blk> 0", "⁇ 1", "▁ 2"] and lines[3] == "a 3" and len(lines) == len(VOCAB)
    meta = json.loads((fp32 / "speechtl-onnx.json").read_text())
    assert meta["vocab"] == VOCAB.tokens and meta["mode"] == "frozen" and is_onnx_dir(fp32)


def test_a_padded_batch_gives_torch_log_probs_clip_by_clip(whisper_frozen, exported, clips):
    from speechtl.data.audio import load_audio

    torch_rec, onnx_rec = Recognizer.load(whisper_frozen), OnnxRecognizer.load(exported[0])
    wavs = [load_audio(c) for c in clips]
    batched = onnx_rec.model.log_probs(wavs)  # one padded batch of three lengths
    for w, lp in zip(wavs, batched):
        with torch.inference_mode():
            logits, frames = torch_rec.model(torch.from_numpy(w)[None], torch.tensor([w.size]))
        ref = torch.log_softmax(logits, -1)[0, : int(frames[0])].numpy()
        assert lp.shape == ref.shape
        assert np.abs(lp - ref).max() < 1e-3


def test_transcripts_words_and_subtitles_equal_the_torch_path_long_files_too(whisper_frozen, exported, clips, tmp_path):
    from speechtl.inference.transcribe import render

    long = make_wav(tmp_path / "long.wav", 9.5, freq=450.0)
    torch_rec, onnx_rec = Recognizer.load(whisper_frozen), speechtl_load(exported[0])
    kw = dict(return_timestamps=True, chunk_length_s=4.0)  # the 9.5 s file runs in windows
    a, b = torch_rec.transcribe([*clips, long], **kw), onnx_rec.transcribe([*clips, long], **kw)
    _same_transcripts(a, b)
    assert any(t.words for t in a), "nothing decoded: the comparison would be empty"
    assert render(a[-1], "srt") == render(b[-1], "srt")


def speechtl_load(path):
    import speechtl

    rec = speechtl.load(path)
    assert isinstance(rec, OnnxRecognizer)
    return rec


def test_short_files_run_side_by_side_on_one_thread_sessions(exported, clips):
    """streams=2: each short file's batch on a one-thread session, two at a time; the
    transcripts equal one batch at a time on the all-thread session."""
    from speechtl.inference.transcribe import transcribe_inputs

    rec = OnnxRecognizer(exported[1])
    files = [*clips, *clips]
    alone = transcribe_inputs(rec.transcriber(max_batch_seconds=1.0, streams=1), files, False, True)
    assert set(rec.model._sessions) == {None}
    together = transcribe_inputs(rec.transcriber(max_batch_seconds=1.0, streams=2), files, False, True)
    assert set(rec.model._sessions) == {None, 1}  # the one-thread session, made when first needed
    assert rec.model._sessions[1].get_session_options().intra_op_num_threads == 1
    _same_transcripts(alone, together)
    assert any(t.text for t in alone), "nothing decoded: the comparison would be empty"


def test_the_memory_arena_is_on_by_default_and_off_when_asked_same_log_probs(exported, clips):
    from speechtl.data.audio import load_audio

    on, off = OnnxRecognizer(exported[0]), OnnxRecognizer(exported[0], arena=False)
    assert on.model.session.get_session_options().enable_cpu_mem_arena is True
    assert off.model.session.get_session_options().enable_cpu_mem_arena is False
    wavs = [load_audio(c) for c in clips]
    assert on.model._run_options(16_000) is None  # short runs keep the arena's memory for the next
    shrink = on.model._run_options(int(ARENA_KEEP_SECONDS * 16_000) + 1)  # long ones give it back
    assert shrink.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert off.model._run_options(10**9) is None
    long = np.resize(wavs[0], int((ARENA_KEEP_SECONDS + 1) * 16_000))  # a run that shrinks the arena after
    for _ in range(2):  # the second round reuses the arena's memory
        for batch in (wavs, [long], wavs):
            for a, b in zip(on.model.log_probs(batch), off.model.log_probs(batch)):
                assert a.shape == b.shape and a.shape[0] > 0
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_clips_shorter_than_a_frame_decode(exported, tmp_path):
    rec = OnnxRecognizer.load(exported[1])
    for n in (1, 100, 399):
        assert isinstance(rec.transcribe(np.full(n, 0.1, np.float32)), str)
    assert rec.model.log_probs([np.zeros(100, np.float32)])[0].shape[0] == 1  # one frame, as torch gives


def test_int8_runs_and_mostly_agrees_with_float(exported, clips):
    f, q = OnnxRecognizer.load(exported[0]), OnnxRecognizer.load(exported[1])
    from speechtl.data.audio import load_audio

    for c in clips:
        a, b = f.model.log_probs([load_audio(c)])[0], q.model.log_probs([load_audio(c)])[0]
        assert a.shape == b.shape and np.isfinite(b).all()
        assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.8


def test_finetuned_wav2vec2_and_lora_adapter_models_export(tmp_path, tiny_encoder, clips):
    for mode, kw in (("finetune", {}), ("adapter", dict(adapter=AdapterConfig("lora", rank=4, alpha=8.0), language="xx"))):
        model_dir = _model_dir(tmp_path, str(tiny_encoder), mode, **kw)
        out = export_onnx(model_dir, tmp_path / f"{mode}-onnx")
        a = Recognizer.load(model_dir).transcribe(clips, return_timestamps=True)
        b = OnnxRecognizer.load(out, lang=kw.get("language")).transcribe(clips, return_timestamps=True)
        _same_transcripts(a, b)
    with pytest.raises(OnnxFolderError, match="exported for language xx"):
        OnnxRecognizer.load(out, lang="cs")


def test_the_runtime_imports_neither_torch_nor_transformers(exported, clips, tmp_path):
    import soundfile as sf

    long = tmp_path / "long.wav"  # over the 2 s chunk below: cut at pauses by the VAD, without torch
    pause = np.zeros(8000, np.float32)
    sf.write(long, np.concatenate([x for c in clips for x in (sf.read(c, dtype="float32")[0], pause)]), 16000)
    code = (f"import sys, json; from speechtl.cli.app import main;"
            f"rc = main(['transcribe', {str(exported[1])!r}, {str(clips[0])!r}, '--format', 'json', '-q']);"
            # short files side by side (one batch each): streams without torch
            f"rc |= main(['transcribe', {str(exported[1])!r}, *{[str(c) for c in clips]!r}, '--batch-seconds', '1', '--streams', '2', '-q']);"
            f"rc |= main(['transcribe', {str(exported[1])!r}, {str(long)!r}, '--chunk-length-s', '2', '--out', {str(tmp_path / 'l')!r}, '-q']);"
            "from speechtl.inference import vad; assert vad._detector.cache_info().currsize == 1, 'the VAD did not run';"
            f"rc |= main(['evaluate', {str(exported[1])!r}, {str(tmp_path / 'm.jsonl')!r}, '--out-dir', {str(tmp_path / 'e')!r}, '-q']);"
            "import speechtl; speechtl.load(sys.argv[1]).transcribe(sys.argv[2]);"
            "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'transformers': 'transformers' in sys.modules}))")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "a", "audio": str(clips[0]), "text": "ab", "duration": 1.7}) + "\n")
    r = subprocess.run([sys.executable, "-c", code, str(exported[1]), str(clips[0])], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "torch": False, "transformers": False}
    assert json.loads(r.stdout.splitlines()[0])["path"] == str(clips[0])
    assert "cer" in json.loads((tmp_path / "e" / "summary.json").read_text())


def test_missing_or_mismatched_tokens_txt_is_refused_before_any_work(exported, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported[1], bad)
    (bad / "tokens.txt").unlink()
    with pytest.raises(OnnxFolderError, match="tokens.txt: missing"):
        OnnxRecognizer.load(bad)
    lines = (exported[1] / "tokens.txt").read_text().splitlines()
    lines[4], lines[5] = lines[5], lines[4]
    (bad / "tokens.txt").write_text("\n".join(lines) + "\n")
    assert main(["transcribe", str(bad), "x.wav", "-q"]) == 1
    err = capsys.readouterr().err
    assert "tokens.txt: line 5 is 'c 5', but the model's unit 4 is 'b' (expected 'b 4')" in err
    (bad / "tokens.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(OnnxFolderError, match=f"tokens.txt: {len(VOCAB) - 1} tokens, but the model has {len(VOCAB)}"):
        OnnxRecognizer.load(bad)


def test_seq2seq_and_mms_models_are_refused_before_loading(tmp_path, capsys):
    for mode, extra in (("seq2seq", {}), ("adapter", {"adapter": {"kind": "mms", "dim": 16}, "languages": {"xx": {}}})):
        d = tmp_path / mode
        d.mkdir()
        (d / "speechtl.json").write_text(json.dumps({"mode": mode, **extra}))  # nothing else: loading would fail
        assert main(["export", str(d), "--format", "onnx", "--out", str(tmp_path / f"{mode}-out")]) == 1
        err = capsys.readouterr().err
        assert ("autoregressive decoder" if mode == "seq2seq" else "adapter=mms") in err
        assert not (tmp_path / f"{mode}-out").exists()
    with pytest.raises(ExportError, match="only int8"):
        export_onnx(tmp_path / "seq2seq", tmp_path / "x", quantize="int4")


def test_sherpa_onnx_reads_the_folder_and_agrees_on_a_normalised_wav2vec2(tmp_path, tiny_encoder, clips):
    """sherpa-onnx's omnilingual CTC type feeds the graph one waveform, normalised to zero mean and
    unit variance, as a wav2vec2 encoder with do_normalize does itself: the texts agree."""
    sherpa_onnx = pytest.importorskip("sherpa_onnx")
    from speechtl.data.audio import load_audio

    out = export_onnx(_model_dir(tmp_path, str(tiny_encoder), "finetune"), tmp_path / "onnx")
    rec = sherpa_onnx.OfflineRecognizer.from_omnilingual_asr_ctc(model=str(out / "model.onnx"), tokens=str(out / "tokens.txt"))
    ours = OnnxRecognizer.load(out).transcribe(clips)
    theirs = []
    for c in clips:
        s = rec.create_stream()
        s.accept_waveform(16_000, load_audio(c))
        rec.decode_stream(s)
        theirs.append(" ".join(s.result.text.split()))
    assert theirs == ours and any(ours)


def test_sherpa_onnx_gives_a_whisper_front_end_speech_level(exported, clips):
    """sherpa-onnx hands the graph unit-variance audio; without lengths the graph brings it to an
    RMS of 0.1, so sherpa-onnx's texts are speechtl's on the clip at that level."""
    sherpa_onnx = pytest.importorskip("sherpa_onnx")
    from speechtl.data.audio import load_audio

    rec = sherpa_onnx.OfflineRecognizer.from_omnilingual_asr_ctc(model=str(exported[0] / "model.onnx"),
                                                                 tokens=str(exported[0] / "tokens.txt"))
    ours = OnnxRecognizer.load(exported[0])
    for c in clips:
        a = load_audio(c) * 0.5  # not at RMS 0.1 already
        s = rec.create_stream()
        s.accept_waveform(16_000, a)
        rec.decode_stream(s)
        at_level = (a - a.mean()) / np.sqrt(a.var() + 1e-5) * 0.1
        assert " ".join(s.result.text.split()) == ours.transcribe(at_level.astype(np.float32))
        # the level does matter to this front end (a random model's greedy text may not show it)
        assert np.abs(ours.model.log_probs([a])[0] - ours.model.log_probs([a * 20])[0]).max() > 0.05


def test_an_lm_exported_into_the_folder_is_its_default_decoder(whisper_frozen, clips, tmp_path):
    pytest.importorskip("pyctcdecode")
    from speechtl.decoding.lm import build_arpa

    lm = tmp_path / "words.arpa"
    lm.write_text(build_arpa(["abc bad", "cab dab fed", "ace bead"], 2))
    assert main(["export", str(whisper_frozen), "--format", "onnx", "--lm", str(lm), "--alpha", "0.9",
                 "--out", str(tmp_path / "o")]) == 0
    rec = OnnxRecognizer.load(tmp_path / "o")
    assert (tmp_path / "o" / "lm.arpa").read_text() == lm.read_text()
    default = rec.transcribe(clips)
    assert default == rec.transcribe(clips, lm=str(tmp_path / "o" / "lm.arpa"), alpha=0.9)
    assert type(rec.transcriber().decoder).__name__ == "BeamDecoder"  # not greedy
    assert rec.evaluate([], out_dir=None)["decoder"] == "beam"


def test_float_layers_stay_out_of_int8(whisper_frozen, tmp_path):
    import onnx

    out = export_onnx(whisper_frozen, tmp_path / "q", quantize="int8", float_layers=(0,))
    nodes = onnx.load(str(out / "model.int8.onnx")).graph.node
    integer = [n.name for n in nodes if n.op_type == "MatMulInteger"]
    assert integer and not any("layers.0/" in n for n in integer) and any("layers.1/" in n for n in integer)
    with pytest.raises(ExportError, match="is for --quantize int8"):
        export_onnx(whisper_frozen, tmp_path / "f", float_layers=(0,))


def test_a_group_norm_cnn_runs_one_clip_per_batch_and_equals_torch(tmp_path, clips):
    from conftest import tiny_encoder_dir

    enc = tiny_encoder_dir(tmp_path, "wav2vec2", feat_extract_norm="group")
    model_dir = _model_dir(tmp_path, str(enc), "finetune")
    out = export_onnx(model_dir, tmp_path / "onnx")
    assert json.loads((out / "speechtl-onnx.json").read_text())["one_clip_per_batch"] is True
    _same_transcripts(Recognizer.load(model_dir).transcribe(clips, return_timestamps=True),
                      OnnxRecognizer.load(out).transcribe(clips, return_timestamps=True))
    q = export_onnx(model_dir, tmp_path / "int8", quantize="int8")  # its CNN as products, the GroupNorm too
    assert json.loads((q / "speechtl-onnx.json").read_text())["int8_cnn"] is True
    from speechtl.data.audio import load_audio

    f, q = OnnxRecognizer.load(out), OnnxRecognizer.load(q)
    for c in clips:
        a, b = f.model.log_probs([load_audio(c)])[0], q.model.log_probs([load_audio(c)])[0]
        assert a.shape == b.shape and (a.argmax(-1) == b.argmax(-1)).mean() > 0.8


def test_int8_writes_the_cnn_as_products_and_quantises_all_but_its_first_layer(tmp_path, tiny_encoder, clips,
                                                                                whisper_frozen, exported):
    """The default for a wav2vec2-family int8 export; --float-cnn (int8_cnn=False) keeps the
    CNN's convolutions in float; Whisper encoders keep theirs, and insisting is an error."""
    import onnx

    from speechtl.data.audio import load_audio

    model_dir = _model_dir(tmp_path, str(tiny_encoder), "finetune")
    plain = export_onnx(model_dir, tmp_path / "plain", quantize="int8", int8_cnn=False)
    cnn = export_onnx(model_dir, tmp_path / "cnn", quantize="int8")
    meta = lambda d: json.loads((d / "speechtl-onnx.json").read_text())  # noqa: E731
    assert meta(cnn)["int8_cnn"] is True and meta(plain)["int8_cnn"] is False
    assert meta(exported[1])["int8_cnn"] is False  # the Whisper-shaped fixture, int8 by default
    nodes = onnx.load(str(cnn / "model.int8.onnx")).graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    assert convs and not any("feature_extractor" in n for n in convs), convs  # the CNN's are products now
    layers = len(_feature_encoder(tiny_encoder).conv_layers)
    floats = [n for n in nodes if n.op_type == "MatMul" and any(i.endswith("matmul_cnn.w0") for i in n.input)]
    assert len(floats) == 1  # the first layer, on raw samples, stays in float
    integer = [n for n in nodes if n.op_type == "MatMulInteger"]
    plain_nodes = onnx.load(str(plain / "model.int8.onnx")).graph.node
    assert any(n.op_type == "Conv" and "feature_extractor" in n.name for n in plain_nodes)  # without the option
    before = [n for n in plain_nodes if n.op_type == "MatMulInteger"]
    # the block form: a layer of kernel k and stride s is ceil(k / s) products, all but the first layer's in int8
    products = sum(-(-layer.conv.kernel_size[0] // layer.conv.stride[0]) for layer in _feature_encoder(tiny_encoder).conv_layers[1:])
    assert layers > 2 and len(integer) == len(before) + products
    f, q = OnnxRecognizer.load(export_onnx(model_dir, tmp_path / "f32")), OnnxRecognizer.load(cnn)
    for c in clips:
        a, b = f.model.log_probs([load_audio(c)])[0], q.model.log_probs([load_audio(c)])[0]
        assert a.shape == b.shape and (a.argmax(-1) == b.argmax(-1)).mean() > 0.8
    assert main(["export", str(model_dir), "--format", "onnx", "--quantize", "int8", "--float-cnn", "--out",
                 str(tmp_path / "cli"), "-q"]) == 0
    assert meta(tmp_path / "cli")["int8_cnn"] is False
    with pytest.raises(SystemExit):  # one or the other
        main(["export", str(model_dir), "--format", "onnx", "--quantize", "int8", "--float-cnn", "--int8-cnn",
              "--out", str(tmp_path / "both")])
    with pytest.raises(ExportError, match="is for --quantize int8"):
        export_onnx(model_dir, tmp_path / "x", int8_cnn=True)
    with pytest.raises(ExportError, match="--int8-cnn: for wav2vec2-family encoders"):
        export_onnx(whisper_frozen, tmp_path / "y", quantize="int8", int8_cnn=True)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("norm,stack", [("layer", None), ("group", None), ("layer", ((4, 5), (3, 2))),
                                        ("group", ((6, 5, 2), (4, 5, 3))), ("layer", ((2, 3, 3), (5, 4, 2)))])
def test_the_product_form_of_the_cnn_equals_its_convolutions_at_every_length(tmp_path, norm, stack):
    """LayerNorm CNNs and GroupNorm ones (over time: padded frames must not count), wav2vec2's
    kernels and strides and others (a product of the first two strides above the first
    kernel, a kernel below its stride), in torch at lengths of every remainder, and as a
    traced ONNX graph at lengths it was not traced at."""
    import onnxruntime as ort

    from conftest import tiny_encoder_dir
    from speechtl.encoders.fast_cnn import time_major_supported
    from speechtl.models.onnx_export import _MatmulCNN

    shape = {} if stack is None else dict(conv_kernel=stack[0], conv_stride=stack[1], conv_dim=(32,) * len(stack[0]))
    fe = _feature_encoder(tiny_encoder_dir(tmp_path, "wav2vec2", feat_extract_norm=norm, **shape))
    assert time_major_supported(fe)
    cnn = _MatmulCNN(fe.conv_layers).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in [400, 401, *range(405, 725, 7), 7_777, 16_000]:
            x = torch.randn(2, n, generator=gen) * 0.1
            ref = type(fe).forward(fe, x)
            got = cnn(x)
            assert got.shape == ref.shape, n
            assert ref.abs().max() > 0.1 and torch.allclose(got, ref, atol=1e-4), n
        path = tmp_path / "cnn.onnx"
        torch.onnx.export(cnn, (torch.randn(1, 5_000, generator=gen),), str(path), input_names=["x"], output_names=["y"],
                          dynamo=False, dynamic_axes={"x": {0: "b", 1: "s"}, "y": {0: "b", 2: "t"}})
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for n in (400, 401, 409, 3_331, 12_345):
            x = torch.randn(3, n, generator=gen) * 0.1
            ref = type(fe).forward(fe, x).numpy()
            got = sess.run(None, {"x": x.numpy()})[0]
            assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4, n


def _feature_encoder(encoder_dir):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(encoder_dir)).feature_extractor


def test_int8_keeps_the_first_layer_of_whisper_encoders_in_float():
    from types import SimpleNamespace

    from speechtl.cli.train import _layer_list
    from speechtl.models.onnx_export import default_float_layers

    assert default_float_layers(SimpleNamespace(model_type="whisper", d_model=512)) == (0,)  # whisper-base
    assert default_float_layers(SimpleNamespace(model_type="whisper", d_model=384)) == (0,)  # the bundled encoder
    assert default_float_layers(SimpleNamespace(model_type="wav2vec2", hidden_size=1024)) == ()
    assert _layer_list("") == () and _layer_list("0,3") == (0, 3)


def test_a_product_form_that_misses_the_convolutions_stops_the_export(tmp_path, tiny_encoder, monkeypatch):
    from speechtl.models import onnx_export

    model_dir = _model_dir(tmp_path, str(tiny_encoder), "finetune")
    right = onnx_export._MatmulCNN.forward
    monkeypatch.setattr(onnx_export._MatmulCNN, "forward", lambda self, x: right(self, x)[..., :-1])  # a frame short
    with pytest.raises(ExportError, match="--float-cnn"):
        export_onnx(model_dir, tmp_path / "q", quantize="int8")
    assert not (tmp_path / "q").exists()
    assert export_onnx(model_dir, tmp_path / "f", quantize="int8", int8_cnn=False).is_dir()
