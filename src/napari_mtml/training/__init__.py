"""Training: task/fold splits, the loop, safe checkpoints."""
