"""Training engine: the loop, checkpoints, EMA and distributed helpers."""
