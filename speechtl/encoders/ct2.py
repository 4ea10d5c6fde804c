"""Reading CTranslate2 model files (faster-whisper's ``model.bin``) without the ctranslate2 package.

A CTranslate2 model file is a flat list of named tensors, little-endian:

    u32 binary version (6)     str spec name ("WhisperSpec")     u32 spec revision
    u32 variable count, then per variable:
        str name   u8 rank   u32 × rank shape   u8 dtype   u32 byte count   bytes
    u32 alias count, then per alias: str alias   str target

where ``str`` is a u16 length (counting a trailing NUL) followed by UTF-8 bytes and the
NUL. We parse it ourselves, checking every length against the file's size and every
tensor's byte count against its shape and dtype, so a truncated or corrupt file is an
error naming the file and the variable, never a silent misread.

:func:`whisper_state_dict` maps a WhisperSpec's variables to the keys of transformers'
``WhisperForConditionalGeneration`` (query/key/value are stored fused; Whisper's key
projection has no bias). :func:`convert_whisper` writes a complete transformers Whisper
directory from a faster-whisper model directory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SUPPORTED_VERSIONS = (5, 6)
# CTranslate2's DataType enum
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
MAX_RANK = 8
MAX_NAME = 4096


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 model file this reader understands, or is damaged."""


@dataclass
class CT2Model:
    spec: str
    revision: int
    variables: dict[str, torch.Tensor]
    aliases: dict[str, str]
    accessed: set = field(default_factory=set)  # names read through get(), to find unmapped ones

    def get(self, name: str) -> torch.Tensor:
        name = self.aliases.get(name, name)
        t = self.variables[name]
        self.accessed.add(name)
        return t

    def scalar(self, name: str):
        return self.get(name).reshape(-1)[0].item()


class _Reader:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise CT2FormatError(f"{self.path}: truncated while reading {what} at byte {self.pos} "
                                 f"(needs {n} bytes, file has {len(self.buf)})")
        out = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size, what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", what)
        if n == 0 or n > MAX_NAME:
            raise CT2FormatError(f"{self.path}: bad string length {n} for {what} at byte {self.pos}")
        raw = bytes(self.take(n, what))
        if raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: {what} at byte {self.pos - n} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise CT2FormatError(f"{self.path}: {what} is not UTF-8 ({e})") from None


def read_ct2(path: str | os.PathLike) -> CT2Model:
    """Parse a CTranslate2 ``model.bin``; tensors come back as torch tensors (copies)."""
    path = str(path)
    size = os.path.getsize(path)
    if size == 0:
        raise CT2FormatError(f"{path}: empty file")
    with open(path, "rb") as f:
        buf = f.read()
    r = _Reader(buf, path)
    version = r.unpack("I", "the binary version")
    if version not in SUPPORTED_VERSIONS:
        raise CT2FormatError(f"{path}: CTranslate2 binary version {version} is not supported "
                             f"(this reader knows {', '.join(map(str, SUPPORTED_VERSIONS))}); is it a CTranslate2 model?")
    spec = r.string("the spec name")
    revision = r.unpack("I", "the spec revision")
    count = r.unpack("I", "the variable count")
    variables: dict[str, torch.Tensor] = {}
    for i in range(count):
        name = r.string(f"variable {i}'s name")
        rank = r.unpack("B", f"{name}'s rank")
        if rank > MAX_RANK:
            raise CT2FormatError(f"{path}: variable {name!r} has rank {rank}")
        shape = [r.unpack("I", f"{name}'s shape") for _ in range(rank)]
        dtype_id = r.unpack("B", f"{name}'s dtype")
        if dtype_id not in DTYPES:
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
        nbytes = r.unpack("I", f"{name}'s byte count")
        dtype = DTYPES[dtype_id]
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if nbytes != math.prod(shape) * itemsize:
            raise CT2FormatError(f"{path}: variable {name!r} declares {nbytes} bytes for shape {shape} "
                                 f"of {itemsize}-byte values")
        data = r.take(nbytes, f"variable {name!r}")
        if dtype == "bfloat16":
            t = torch.frombuffer(bytearray(data), dtype=torch.bfloat16)
        else:
            t = torch.from_numpy(np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).copy())
        variables[name] = t.reshape(shape)
    aliases = {}
    if r.pos < size:
        for _ in range(r.unpack("I", "the alias count")):
            alias = r.string("an alias")
            aliases[alias] = r.string(f"alias {alias!r}'s target")
    if r.pos != size:
        raise CT2FormatError(f"{path}: {size - r.pos} unexpected bytes after the last record")
    for alias, target in aliases.items():
        if target not in variables:
            raise CT2FormatError(f"{path}: alias {alias!r} points at missing variable {target!r}")
    return CT2Model(spec, revision, variables, aliases)


def write_ct2(path: str | os.PathLike, variables: dict[str, torch.Tensor], aliases: dict[str, str] | None = None,
              spec: str = "WhisperSpec", revision: int = 3) -> None:
    """Write the format :func:`read_ct2` reads (tests; float32/float16/int8/int16/int32)."""
    codes = {torch.float32: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.float16: 4}

    def s(text: str) -> bytes:
        raw = text.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    with open(path, "wb") as f:
        f.write(struct.pack("<I", 6) + s(spec) + struct.pack("<II", revision, len(variables)))
        for name, t in variables.items():
            t = t.contiguous()
            f.write(s(name) + struct.pack("<B", t.dim()) + b"".join(struct.pack("<I", d) for d in t.shape))
            data = t.numpy().tobytes()
            f.write(struct.pack("<BI", codes[t.dtype], len(data)) + data)
        aliases = aliases or {}
        f.write(struct.pack("<I", len(aliases)))
        for a, target in aliases.items():
            f.write(s(a) + s(target))


# ----------------------------------------------------------------------------- Whisper


def _layer_count(m: CT2Model, prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/weight" in m.variables:
        n += 1
    return n


def whisper_config_dict(m: CT2Model) -> dict:
    """The architecture of a WhisperSpec, as ``transformers.WhisperConfig`` keyword arguments."""
    if m.spec != "WhisperSpec":
        raise CT2FormatError(f"a {m.spec} model, not a Whisper one")
    try:
        conv1 = m.get("encoder/conv1/weight")
        d_model, n_mels = int(conv1.shape[0]), int(conv1.shape[1])
        return dict(
            vocab_size=int(m.get("decoder/embeddings/weight").shape[0]),
            num_mel_bins=n_mels,
            d_model=d_model,
            encoder_layers=_layer_count(m, "encoder"),
            decoder_layers=_layer_count(m, "decoder"),
            encoder_attention_heads=int(m.scalar("encoder/num_heads")),
            decoder_attention_heads=int(m.scalar("decoder/num_heads")),
            encoder_ffn_dim=int(m.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
            decoder_ffn_dim=int(m.get("decoder/layer_0/ffn/linear_0/weight").shape[0]),
            max_source_positions=int(m.get("encoder/position_encodings/encodings").shape[0]),
            max_target_positions=int(m.get("decoder/position_encodings/encodings").shape[0]),
        )
    except KeyError as e:
        raise CT2FormatError(f"not a complete Whisper model: variable {e} is missing") from None


def _split_qkv(prefix: str, w: torch.Tensor, b: torch.Tensor, d: int, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for i, n in enumerate(names):
        out[f"{prefix}.{n}.weight"] = w[i * d:(i + 1) * d]
        if n != "k_proj":  # Whisper's key projection has no bias
            out[f"{prefix}.{n}.bias"] = b[i * d:(i + 1) * d]
        elif b[i * d:(i + 1) * d].abs().max() > 0:
            raise CT2FormatError(f"{prefix}: the key bias is not zero; transformers' Whisper has none")
    return out


def _ln(dst: str, m: CT2Model, src: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": m.get(f"{src}/gamma"), f"{dst}.bias": m.get(f"{src}/beta")}


def _weight(m: CT2Model, name: str) -> torch.Tensor:
    """A weight as float32, dequantised when CTranslate2 stored it as int8 (one scale per
    output row, ``weight_scale``) or int16 (one scale): ``w = q / scale``."""
    w = m.get(name)
    if w.dtype in (torch.int8, torch.int16):
        scale_name = f"{name}_scale"
        if scale_name not in m.variables:
            raise CT2FormatError(f"{name} is quantised ({w.dtype}) but {scale_name} is missing")
        scale = m.get(scale_name).float()
        w = w.float() / (scale.reshape(-1, *([1] * (w.dim() - 1))) if scale.numel() > 1 else scale.reshape(()))
    return w.float()


def _lin(dst: str, m: CT2Model, src: str) -> dict[str, torch.Tensor]:
    return {f"{dst}.weight": _weight(m, f"{src}/weight"), f"{dst}.bias": m.get(f"{src}/bias")}


# scalars and flags of a WhisperSpec that transformers' Whisper fixes by construction
_SPEC_SCALARS = ("activation", "alibi", "alignment_heads", "alignment_layer", "num_heads", "pre_norm",
                 "scale_embeddings", "start_from_zero_embedding", "multi_query_attention", "rotary_dim",
                 "rotary_interleave", "rms_norm", "parallel_residual", "shared_layer_norm")


def _self_attention_and_ffn(m: CT2Model, src: str, dst: str, d: int) -> dict[str, torch.Tensor]:
    """What encoder and decoder layers share: fused self-attention, its norm, the FFN and its norm."""
    out = _split_qkv(f"{dst}.self_attn", _weight(m, f"{src}/self_attention/linear_0/weight"),
                     m.get(f"{src}/self_attention/linear_0/bias"), d, ("q_proj", "k_proj", "v_proj"))
    out.update(_lin(f"{dst}.self_attn.out_proj", m, f"{src}/self_attention/linear_1"))
    out.update(_ln(f"{dst}.self_attn_layer_norm", m, f"{src}/self_attention/layer_norm"))
    out.update(_lin(f"{dst}.fc1", m, f"{src}/ffn/linear_0"))
    out.update(_lin(f"{dst}.fc2", m, f"{src}/ffn/linear_1"))
    out.update(_ln(f"{dst}.final_layer_norm", m, f"{src}/ffn/layer_norm"))
    return out


def whisper_state_dict(m: CT2Model, decoder: bool = True, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``WhisperModel`` keys (``encoder.*``, ``decoder.*``) from a WhisperSpec; every
    variable of the spec must map (a leftover one is an error, not silently dropped)."""
    cfg = whisper_config_dict(m)
    d = cfg["d_model"]
    sd: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        sd.update(_lin(f"encoder.{conv}", m, f"encoder/{conv}"))
    sd["encoder.embed_positions.weight"] = m.get("encoder/position_encodings/encodings")
    for i in range(cfg["encoder_layers"]):
        sd.update(_self_attention_and_ffn(m, f"encoder/layer_{i}", f"encoder.layers.{i}", d))
    sd.update(_ln("encoder.layer_norm", m, "encoder/layer_norm"))
    if decoder:
        sd["decoder.embed_tokens.weight"] = _weight(m, "decoder/embeddings/weight")
        sd["decoder.embed_positions.weight"] = m.get("decoder/position_encodings/encodings")
        for i in range(cfg["decoder_layers"]):
            src, dst = f"decoder/layer_{i}", f"decoder.layers.{i}"
            sd.update(_self_attention_and_ffn(m, src, dst, d))
            sd.update(_lin(f"{dst}.encoder_attn.q_proj", m, f"{src}/attention/linear_0"))
            sd.update(_split_qkv(f"{dst}.encoder_attn", _weight(m, f"{src}/attention/linear_1/weight"),
                                 m.get(f"{src}/attention/linear_1/bias"), d, ("k_proj", "v_proj")))
            sd.update(_lin(f"{dst}.encoder_attn.out_proj", m, f"{src}/attention/linear_2"))
            sd.update(_ln(f"{dst}.encoder_attn_layer_norm", m, f"{src}/attention/layer_norm"))
        sd.update(_ln("decoder.layer_norm", m, "decoder/layer_norm"))
    # every variable must have been read: an unknown one would mean a model we would misread
    prefixes = ("encoder/", "decoder/") if decoder else ("encoder/",)
    leftover = [n for n in m.variables if n.startswith(prefixes) and n not in m.accessed
                and n.rsplit("/", 1)[-1] not in _SPEC_SCALARS]
    if leftover:
        raise CT2FormatError(f"variables this converter does not know: {', '.join(sorted(leftover)[:5])}")
    expected_flags = {"decoder/pre_norm": 1, "decoder/alibi": 0, "decoder/scale_embeddings": 0}
    for name, want in expected_flags.items():
        if name in m.variables and int(m.scalar(name)) != want:
            raise CT2FormatError(f"{name} = {int(m.scalar(name))}; transformers' Whisper needs {want}")
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def is_ct2_dir(path: str | os.PathLike) -> bool:
    """A faster-whisper / CTranslate2 model directory: ``model.bin`` and no transformers config."""
    p = Path(path)
    if not (p / "model.bin").is_file():
        return False
    cfg = p / "config.json"
    if not cfg.is_file():
        return True
    try:
        return "model_type" not in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return True


def load_ct2_whisper(path: str | os.PathLike, decoder: bool = True):
    """``(transformers.WhisperConfig, WhisperModel state dict)`` from a CTranslate2 directory."""
    from transformers import WhisperConfig

    path = Path(path)
    m = read_ct2(path / "model.bin")
    kw = whisper_config_dict(m)
    kw.update(_token_ids(path, kw["vocab_size"]))
    # token suppression lives in the generation config only (transformers warns when both carry it)
    kw.update(suppress_tokens=None, begin_suppress_tokens=None)
    return WhisperConfig(**kw), whisper_state_dict(m, decoder=decoder)


def _ct2_extra(path: Path) -> dict:
    cfg = path / "config.json"
    return json.loads(cfg.read_text()) if cfg.is_file() else {}


def _vocabulary(path: Path) -> dict[str, int]:
    """Token -> id from ``vocabulary.txt`` (one token a line) or ``vocabulary.json``."""
    txt, js = path / "vocabulary.txt", path / "vocabulary.json"
    if txt.is_file():
        return {tok: i for i, tok in enumerate(txt.read_text(encoding="utf-8").split("\n")) if tok}
    if js.is_file():
        return {tok: i for i, tok in enumerate(json.loads(js.read_text(encoding="utf-8")))}
    return {}


def _token_ids(path: Path, vocab_size: int) -> dict:
    """Special-token ids, from the vocabulary when present, else OpenAI's layout."""
    vocab = _vocabulary(path)
    multilingual = vocab_size >= 51865
    eot = vocab.get("<|endoftext|>", 50257 if multilingual else 50256)
    sot = vocab.get("<|startoftranscript|>", eot + 1)
    if max(eot, sot) >= vocab_size:
        raise CT2FormatError(f"{path}: no vocabulary.txt naming <|endoftext|> and <|startoftranscript|>, and the "
                             f"vocabulary ({vocab_size}) is too small for OpenAI's token layout")
    return dict(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=sot)


def whisper_generation_config(path: Path, config) -> dict:
    """A generation config for transformers' Whisper ``generate`` (language and task tokens,
    timestamps, suppression), built from the CTranslate2 directory's vocabulary and config."""
    vocab = _vocabulary(path)
    extra = _ct2_extra(path)
    multilingual = config.vocab_size >= 51865
    inv = {i: t for t, i in vocab.items()}
    lang_to_id = {inv[i]: i for i in extra.get("lang_ids", []) if i in inv} if multilingual else {}
    gen = dict(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        decoder_start_token_id=config.decoder_start_token_id, max_length=config.max_target_positions,
        suppress_tokens=extra.get("suppress_ids", []), begin_suppress_tokens=extra.get("suppress_ids_begin", [220, config.eos_token_id]),
        alignment_heads=extra.get("alignment_heads", []), is_multilingual=multilingual,
        no_timestamps_token_id=vocab.get("<|notimestamps|>"), prev_sot_token_id=vocab.get("<|startofprev|>"),
        max_initial_timestamp_index=50, return_timestamps=False,
    )
    if multilingual:
        gen["lang_to_id"] = lang_to_id
        gen["task_to_id"] = {"transcribe": vocab["<|transcribe|>"], "translate": vocab["<|translate|>"]}
    return gen


def convert_whisper(ct2_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a transformers Whisper directory (model, tokenizer, feature extractor,
    generation config) from a faster-whisper model directory; atomic."""
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from ..core.io import atomic_dir

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    config, sd = load_ct2_whisper(ct2_dir)
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.model.load_state_dict(sd, strict=False)
    if unexpected or missing:
        raise CT2FormatError(f"{ct2_dir}: weights do not fit transformers' Whisper (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.tie_weights()  # proj_out shares the token embedding, as in the CTranslate2 alias
    model.generation_config = GenerationConfig(**whisper_generation_config(ct2_dir, config))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(str(tmp))
        if (ct2_dir / "tokenizer.json").is_file():
            from transformers import WhisperTokenizerFast

            tok = WhisperTokenizerFast(tokenizer_file=str(ct2_dir / "tokenizer.json"))
            tok.save_pretrained(str(tmp))
    return out_dir
