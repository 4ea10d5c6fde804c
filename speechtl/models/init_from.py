"""Starting a run from a trained model folder (``init_from``): its encoder, and the output
rows of the tokens both vocabularies share; or, for an adapter model, one more language."""

from __future__ import annotations

import os
from dataclasses import asdict

from ..core.io import load_safetensors
from ..data.text import Vocabulary
from ..data.units import describe_units, load_vocabulary, units_of
from . import adapters as adapter_lib
from .adapters import AdapterConfig
from .ctc import CTCModel, HeadConfig
from .model_dir import _read_language, language_files, read_meta, resolve_model_dir
from .modes import mode_policy


def init_from_model(model: CTCModel, vocab: Vocabulary, model_dir: str | os.PathLike) -> dict:
    """Start ``model`` (whose encoder was loaded from ``model_dir/encoder``) from the trained
    recogniser in ``model_dir``, whose vocabulary may differ from ``vocab``: the head and
    the layer weights are copied, and the output layer keeps the rows (and biases) of the
    tokens both vocabularies have; rows of new tokens keep their fresh initialisation.
    Subword pieces are tokens as characters are; a character model and a subword model
    have no rows in common, so starting one from the other is refused.

    An adapter model started from an adapter model keeps that model's other languages (to
    be written beside its own), and starts from its language's adapters and head when the
    model has it; a new language starts fresh.
    Returns ``{"kept": [...], "added": [...], "removed": [...]}``."""
    model_dir = resolve_model_dir(model_dir)
    meta = read_meta(model_dir)
    old_units, new_units = meta.get("units", "char"), units_of(vocab)
    if (old_units == "char") != (new_units == "char"):  # subword models of either kind share pieces ("▁ab")
        raise ValueError(f"config key 'init_from': {model_dir} predicts {describe_units(old_units)} units ({old_units}) and "
                         f"this run {describe_units(new_units)} units ({new_units}); one output layer cannot start the "
                         f"other. Train with units={old_units}, or start from its encoder alone with "
                         f"encoder={model_dir / 'encoder'}")
    source = mode_policy(meta["mode"])
    if source.adapters and not model.policy.adapters:
        raise ValueError(f"config key 'init_from': {model_dir} is an adapter model (languages "
                         f"{', '.join(sorted(meta.get('languages', {})))}); add a language to it with mode=adapter "
                         f"lang=L, or fine-tune its base encoder with encoder={model_dir / 'encoder'}")
    if not model.policy.may_start_from(source):
        raise ValueError(f"config key 'init_from': {model_dir} is a {meta['mode']} model and this run is {model.mode}; "
                         "a frozen model's head sits on a weighted layer sum, a fine-tuned one's on the last layer")
    old_head, new_head = HeadConfig(**meta["head"]), model.head_config
    shape = ("kind",) if new_head.kind == "linear" else ("kind", "hidden_size", "num_layers")
    if any(getattr(old_head, k) != getattr(new_head, k) for k in shape):
        raise ValueError(f"config key 'init_from': {model_dir} has a {old_head.kind} head ({asdict(old_head)}), this run "
                         f"{asdict(new_head)}; use the same head type and size (head, bilstm_hidden, bilstm_layers)")
    if source.adapters:
        if AdapterConfig.from_dict(meta["adapter"]) != model.adapter_config:
            raise ValueError(f"config key 'init_from': {model_dir} holds {meta['adapter']} adapters, this run "
                             f"{model.adapter_config.to_dict()}")
        for lang, record in meta["languages"].items():
            if lang != model.language:
                model.other_languages[lang] = {"meta": record, "files": {name: (model_dir / name).read_bytes()
                                                                        for name in language_files(lang)}}
        if model.language not in meta["languages"]:
            return {"kept": [], "added": list(vocab.tokens), "removed": [], "new_language": model.language}
        old_vocab, _, adapters, head_state = _read_language(model_dir, model.language)
        adapter_lib.load_adapter_state(model.encoder, adapters, where=str(model_dir / language_files(model.language)[0]))
        state = {}
    else:
        old_vocab = load_vocabulary(model_dir, meta)
        state = load_safetensors(model_dir / "head.safetensors")
        head_state = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    out_keys = [k for k in head_state if k.startswith("proj.")]
    fresh = model.head.state_dict()
    rows_new = [i for i, t in enumerate(vocab.tokens) if t in old_vocab.index]
    rows_old = [old_vocab.index[vocab.tokens[i]] for i in rows_new]
    for k in out_keys:
        carried = fresh[k].clone()
        carried[rows_new] = head_state[k][rows_old]
        head_state[k] = carried
    model.head.load_state_dict(head_state)
    if model.layer_sum is not None:
        model.layer_sum.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("layer_sum.")})
    return {"kept": [vocab.tokens[i] for i in rows_new], "added": [t for t in vocab.tokens if t not in old_vocab.index],
            "removed": [t for t in old_vocab.tokens if t not in vocab.index]}
