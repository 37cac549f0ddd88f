"""Hugging Face Llama <-> megatron-core checkpoint conversion.

``keymap`` (pure tensor-name and layout map), ``config_map`` (LlamaConfig <-> ModelConfig),
``hf_io`` (lazy safetensors reads, shard-by-shard writes), ``dcp_reader`` (tensor-by-tensor reads of
megatron's torch_dist checkpoints), the two directions ``hf_to_mcore`` / ``mcore_to_hf``, and
``verify`` (the export parity gate ``mcore_to_hf`` runs by default).
The command line is ``tools/convert_checkpoint.py``.
"""

from megatron_longctx.checkpoint.hf.config_map import ConversionError
from megatron_longctx.checkpoint.hf.hf_to_mcore import hf_to_mcore, hf_to_mcore_collective
from megatron_longctx.checkpoint.hf.mcore_to_hf import mcore_to_hf
from megatron_longctx.checkpoint.hf.verify import ExportParityError

__all__ = [
    "ConversionError",
    "ExportParityError",
    "hf_to_mcore",
    "hf_to_mcore_collective",
    "mcore_to_hf",
]
