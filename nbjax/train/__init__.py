"""Training: the state, the compiled step, the loop and its checkpoints."""
