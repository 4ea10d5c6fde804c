"""The CTC model (encoder + layer sum + head), heads, adapters, the model-folder format,
distillation, weight averaging and export."""
