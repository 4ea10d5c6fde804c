"""From logits to text: greedy and beam-search CTC decoding, n-gram LM scoring and
building, and WER/CER scoring. Independent of the model classes."""
