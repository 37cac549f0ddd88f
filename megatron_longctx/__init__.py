"""megatron-longctx: long-context continued pretraining of Llama-style models on Megatron-Core."""

from megatron_longctx.logs import WARNING_FILTERS, apply_filters

__version__ = "0.1.0"

# megatron-core warns once per module that imports a fused kernel it cannot find (four to six
# "Transformer Engine and Apex are not installed ..." lines per process on CPU, which buried real
# messages). They are silenced here, before any megatron import, with the other third-party lines
# of megatron_longctx/logs.py's documented list (LONGCTX_LOG_LEVEL=debug shows them all), and
# ``runtime.distributed.init_process_group`` says it once, in one line, on rank 0.
FALLBACK_WARNING = WARNING_FILTERS[0].message
apply_filters()
