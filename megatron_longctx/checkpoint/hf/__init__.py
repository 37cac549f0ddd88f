"""Hugging Face Llama <-> megatron-core checkpoint conversion.

``keymap`` (pure tensor-name and layout map), ``config_map`` (LlamaConfig <-> ModelConfig),
``hf_io`` (lazy safetensors reads, shard-by-shard writes), ``dcp_reader`` (tensor-by-tensor reads of
megatron's torch_dist checkpoints), and the two directions ``hf_to_mcore`` / ``mcore_to_hf``.
The command line is ``tools/convert_checkpoint.py``.
"""

from megatron_longctx.checkpoint.hf.config_map import ConversionError
from megatron_longctx.checkpoint.hf.hf_to_mcore import hf_to_mcore, hf_to_mcore_collective
from megatron_longctx.checkpoint.hf.mcore_to_hf import mcore_to_hf

__all__ = ["ConversionError", "hf_to_mcore", "hf_to_mcore_collective", "mcore_to_hf"]
