"""Property-based tests (hypothesis) of the normaliser, the vocabulary and the manifest parser."""

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speechtl.data.manifest import ManifestError, Utterance, read_manifest, write_manifest
from speechtl.data.text import Normalizer, NormalizerConfig, Vocabulary

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(texts)
def test_normaliser_is_idempotent_and_tidy(text):
    norm = Normalizer()
    once = norm(text)
    assert norm(once) == once
    assert once == once.strip() and "  " not in once
    assert once == once.lower()
    assert not any(ch in string.punctuation.replace("'", "") for ch in once)


@FAST
@given(texts)
def test_normaliser_without_stripping_keeps_every_word_character(text):
    import unicodedata

    norm = Normalizer(NormalizerConfig(lowercase=False, strip_punctuation=False))
    assert norm(text).split() == unicodedata.normalize("NFC", text).split()


@FAST
@given(st.lists(texts, min_size=1, max_size=5), texts)
def test_vocabulary_round_trips_text_it_was_built_from(corpus, other):
    norm = Normalizer()
    corpus = [norm(t) for t in corpus]
    vocab = Vocabulary.build(corpus)
    for t in corpus:
        assert vocab.decode(vocab.encode(t)) == t
        assert vocab.oov_report([t]) == {}
    ids = vocab.encode(norm(other))
    assert all(0 < i < len(vocab) for i in ids)  # unknown characters map to [UNK], never to the blank
    assert (vocab.unk_id in ids) == bool(vocab.oov_report([norm(other)]))


ids = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=12)


@FAST
@given(st.lists(st.tuples(ids, texts, st.floats(0.01, 3600, allow_nan=False)), max_size=8, unique_by=lambda r: r[0]))
def test_manifest_round_trip(tmp_path, rows):
    utts = [Utterance(i, str(tmp_path / f"{n}.wav"), text, dur) for n, (i, text, dur) in enumerate(rows)]
    path = write_manifest(tmp_path / "m.jsonl", utts)
    back = read_manifest(path, check_files=False)
    assert [(u.id, u.audio, u.text, u.duration) for u in back] == [(u.id, u.audio, u.text, u.duration) for u in utts]


@FAST
@given(st.text(max_size=40).filter(lambda s: "\n" not in s and "\r" not in s))
def test_manifest_parser_names_the_line_of_anything_malformed(tmp_path, junk):
    good = {"id": "a", "audio": "a.wav", "text": "x", "duration": 1.0}
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(good) + "\n" + junk + "\n", encoding="utf-8")
    if not junk.strip():  # blank lines are allowed
        assert len(read_manifest(path, check_files=False)) == 1
        return
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: "):
        read_manifest(path, check_files=False)
