"""Foundations every other layer may use: atomic file writes, precision policy, devices and
ranks, the per-user cache root, and shared names. Nothing here imports another speechtl layer."""
