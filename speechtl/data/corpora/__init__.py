"""From sources to manifests: importers (folders, CSV/TSV, LibriSpeech, Common Voice),
public corpora, archives, and espeak-ng synthesis."""
