"""Pretrained speech encoders behind one interface (:mod:`.base`): the wav2vec2 family,
Whisper's encoder, speechtl's own inference modules, CTranslate2 reading, fetching, and
the registry that loads and saves them (:mod:`.registry`)."""
