"""Shared settings of the CLI tests: a tiny U-Net and validation set (TOML for --config) and the
flags that make a 5-fold `mtml train` take seconds."""

# A tiny U-Net and a tiny validation set, so that a 5-fold run takes seconds.
TINY_TOML = """
[model]
base_features = 4
depth = 2
max_features = 8
[training]
val_size = 4
val_interval = 2
warmup_steps = 1
"""
# 2D 16x16 frames, two steps of batch 2 on the CPU, seed 0
FAST = ["--dims", "2", "--kind", "mri", "--frame", "16,16", "--max-steps", "2"]
FAST += ["--batch-size", "2", "--device", "cpu", "--seed", "0"]
