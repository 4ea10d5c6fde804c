"""Training a model: the configuration, data preparation, the run, checkpoints, learning-rate
schedules, evaluation and the loop."""
