"""megatron-longctx: long-context continued pretraining of Llama-style models on Megatron-Core."""

__version__ = "0.1.0"
