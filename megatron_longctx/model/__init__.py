"""Llama-family models on megatron-core's GPTModel: presets, the spec switch, the builder."""
