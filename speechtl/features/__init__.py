"""Encoder features computed once: batched extraction, fingerprints of encoders and audio,
the on-disk feature cache, and the CPU thread plan for running encoders."""
