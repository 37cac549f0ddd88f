"""megatron-longctx: long-context continued pretraining of Llama-style models on Megatron-Core."""

import warnings

__version__ = "0.1.0"

# megatron-core warns once per module that imports a fused kernel it cannot find (four to six
# "Transformer Engine and Apex are not installed ..." lines per process on CPU, which buried real
# messages). They are silenced here, before any megatron import, and
# ``runtime.distributed.init_process_group`` says it once, in one line, on rank 0.
FALLBACK_WARNING = r"(Transformer Engine and )?Apex (are|is) not installed"
warnings.filterwarnings("ignore", message=FALLBACK_WARNING, category=UserWarning)
