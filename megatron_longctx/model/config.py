"""Llama-family model configuration and presets (real sizes for clusters, tiny sizes for CPU tests)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from megatron_longctx.model.rope import validate_rope_scaling
from megatron_longctx.parallel.layout import check_heads


@dataclass
class ModelConfig:
    """A Llama-style decoder (RMSNorm, SwiGLU, GQA, RoPE, no biases).

    Attributes:
        hidden_size: model width d.
        ffn_hidden_size: SwiGLU inner width (gate and up projections each have this many outputs).
        num_layers: transformer layers.
        num_attention_heads: query heads.
        num_query_groups: key/value heads (GQA); equal to heads for plain multi-head attention.
        vocab_size: the tokenizer's vocabulary; the embedding is padded (see padded_vocab_size).
        rope_theta: RoPE base frequency (Llama 3: 500,000; ProLong stage 1: 8e6, stage 2: 1.28e8).
        rope_scaling: None or a dict in transformers' layout (e.g. {"rope_type": "linear",
            "factor": 4}); rope_type default / linear / llama3 / yarn with the fields of
            ``model.rope.ROPE_FIELDS`` (anything else is refused here).
        norm_eps: RMSNorm epsilon.
        tie_word_embeddings: share input embedding and output projection.
        max_position_embeddings: the context length the model is trained for (exported to HF).
        make_vocab_size_divisible_by: Megatron pads the vocabulary to a multiple of this x TP.
        init_method_std: std of the normal initialisation.
    """

    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in (
            "hidden_size",
            "ffn_hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_query_groups",
            "vocab_size",
            "max_position_embeddings",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        check_heads(self.num_attention_heads, self.num_query_groups)  # a LayoutError (ValueError)
        if self.rope_theta <= 0:
            raise ValueError(f"model.rope_theta must be > 0, got {self.rope_theta}")
        if self.head_dim % 2:
            raise ValueError(f"model head_dim {self.head_dim} must be even for RoPE")
        # One translator (model/rope.py): an unsupported rope_type or field is refused here.
        self.rope_scaling = validate_rope_scaling(self.rope_scaling, "model.rope_scaling")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Megatron's rule: round the vocabulary up to a multiple of divisible_by x TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self) -> int:
        """Parameters of the unpadded model (embedding + layers + final norm + output layer)."""
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        kv = self.num_query_groups * self.head_dim
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h
        emb = self.vocab_size * h
        return emb * (1 if self.tie_word_embeddings else 2) + L * per_layer + h

    def with_updates(self, **kwargs) -> ModelConfig:
        return replace(self, **kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # Meta Llama 3 8B (config.json of meta-llama/Meta-Llama-3-8B).
    "llama3-8b": ModelConfig(
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_layers=32,
        num_attention_heads=32,
        num_query_groups=8,
        vocab_size=128256,
        rope_theta=500000.0,
        norm_eps=1e-5,
        max_position_embeddings=8192,
    ),
    # Meta Llama 3 70B.
    "llama3-70b": ModelConfig(
        hidden_size=8192,
        ffn_hidden_size=28672,
        num_layers=80,
        num_attention_heads=64,
        num_query_groups=8,
        vocab_size=128256,
        rope_theta=500000.0,
        norm_eps=1e-5,
        max_position_embeddings=8192,
    ),
    # Meta Llama 2 7B (multi-head attention, 32K sentencepiece vocabulary).
    "llama2-7b": ModelConfig(
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_layers=32,
        num_attention_heads=32,
        num_query_groups=32,
        vocab_size=32000,
        rope_theta=10000.0,
        norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    # CPU test sizes: GQA (4 heads, 2 groups), 4 layers so PP=2 and PP=4 split evenly.
    "tiny": ModelConfig(
        hidden_size=64,
        ffn_hidden_size=128,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=512,
        rope_theta=10000.0,
        norm_eps=1e-5,
        max_position_embeddings=256,
        make_vocab_size_divisible_by=16,
    ),
    "tiny-mha": ModelConfig(
        hidden_size=64,
        ffn_hidden_size=128,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=4,
        vocab_size=300,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        max_position_embeddings=256,
        make_vocab_size_divisible_by=16,
    ),
}


# The chunked loss (model/loss.py): ProLong's LOGIT_BLOCK_SIZE, used when a stage leaves
# loss_chunk_tokens unset and its sequences are longer than Llama 3's native 8K context.
DEFAULT_LOSS_CHUNK_TOKENS = 2048
CHUNKED_LOSS_ABOVE_SEQ_LENGTH = 8192


def resolve_loss_chunk_tokens(setting: int | None, seq_length: int) -> int | None:
    """A stage's ``loss_chunk_tokens`` as the trainer and the planner use it: tokens per loss chunk,
    or None for megatron's unchunked output layer + loss.

    Args:
        setting: None (auto: DEFAULT_LOSS_CHUNK_TOKENS when ``seq_length`` >
            CHUNKED_LOSS_ABOVE_SEQ_LENGTH, else unchunked), 0 (unchunked) or a chunk size > 0.
        seq_length: the stage's tokens per packed sample.
    """
    if setting is None:
        return DEFAULT_LOSS_CHUNK_TOKENS if seq_length > CHUNKED_LOSS_ABOVE_SEQ_LENGTH else None
    if setting < 0:
        raise ValueError(f"loss_chunk_tokens must be >= 0 (0: unchunked) or null, got {setting}")
    return setting or None


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, with field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
