"""Training engine: the loop as phases, its data and run folder, checkpoints, precision, DDP."""
