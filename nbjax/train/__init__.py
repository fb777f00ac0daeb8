"""Training: the state (state), the optimizer and its schedule (optimizer), the compiled train
and eval steps (step), the loop (loop) with its log, checkpoints, workdir lock and preemption
handling, and the TensorBoard writer."""
