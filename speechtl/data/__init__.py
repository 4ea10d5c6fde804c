"""Audio and text in: reading and resampling audio, the JSONL manifest, text normalisation and
vocabularies, subword units, augmentation, and the length-bucketed loader. ``corpora``
turns folders, tables, public corpora, archives and espeak-ng synthesis into manifests."""
