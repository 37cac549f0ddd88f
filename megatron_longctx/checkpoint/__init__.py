"""Checkpoints: one dist_checkpointing path for resume (dist.py), HF conversion in hf/."""
