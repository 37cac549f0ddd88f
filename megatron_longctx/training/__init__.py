"""Training: the step (Megatron calling convention), optimizer, loop, curriculum."""
