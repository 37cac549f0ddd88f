"""Long-context evaluation: needle grid, RULER-style synthetic tasks, loss by position.

``evaluate(model_dir, out_dir, settings)`` on an HF export; ``evaluate_checkpoint`` on a megatron
checkpoint (exports it first). CLI: ``tools/eval_longctx.py``.
"""

from megatron_longctx.eval.runner import (
    EvalSettings,
    evaluate,
    evaluate_checkpoint,
    evaluate_model,
    format_report,
)

__all__ = ["EvalSettings", "evaluate", "evaluate_checkpoint", "evaluate_model", "format_report"]
