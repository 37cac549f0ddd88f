"""The model side of evaluation: an HF export directory loaded with transformers, offline.

Evaluation talks to a model only through :class:`EvalModel`'s small interface (``tokenizer``,
``max_length``, ``generate``, ``token_losses``), so tests can swap in a hand-built oracle with the
same methods. :class:`HFEvalModel` wraps ``LlamaForCausalLM.from_pretrained(dir)`` and a project
tokenizer (``tokenizer.json`` in the directory, or an explicit type + model file).

Batching: prompts of a batch are left-padded; the attention mask hides the padding and position ids
count only real tokens, so a padded prompt sees exactly what it would see alone.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Protocol

import numpy as np
import torch

from megatron_longctx.data.preprocess.tokenizer import HuggingFaceTokenizer, load_tokenizer

logger = logging.getLogger(__name__)


class EvalModel(Protocol):
    """What the evaluation needs from a model."""

    tokenizer: object
    max_length: int
    info: dict

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]: ...

    def token_losses(self, sequences: list[list[int]]) -> list[np.ndarray]: ...


def load_eval_tokenizer(
    model_dir: str, tokenizer_type: str | None = None, tokenizer_model: str | None = None
):
    """The tokenizer of an HF export: explicit type/model, else ``tokenizer.json`` in the dir (or
    its ``hf_tokenizer/`` subdir).

    Raises:
        FileNotFoundError: no tokenizer given and none found in the directory.
    """
    if tokenizer_type or tokenizer_model:
        if not (tokenizer_type and tokenizer_model):
            raise ValueError(
                "pass both --tokenizer-type and --tokenizer-model (or neither, to "
                "use tokenizer.json from the model directory)"
            )
        return load_tokenizer(tokenizer_type, tokenizer_model)
    for d in (model_dir, os.path.join(model_dir, "hf_tokenizer")):
        if os.path.isfile(os.path.join(d, "tokenizer.json")):
            return HuggingFaceTokenizer(d)
    raise FileNotFoundError(
        f"{model_dir} holds no tokenizer.json: pass --tokenizer-type and --tokenizer-model (e.g. "
        "SentencePieceTokenizer data/tok/spm.model), the tokenizer the model was trained with"
    )


class HFEvalModel:
    """A transformers causal LM from a local directory, with greedy batched decoding.

    Args:
        model_dir: directory written by ``save_pretrained`` / ``tools/convert_checkpoint.py``.
        tokenizer: project tokenizer; see :func:`load_eval_tokenizer`.
        dtype: torch dtype to run in (float32 on CPU).
        device: torch device string.
    """

    def __init__(
        self, model_dir: str, tokenizer, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> None:
        from transformers import AutoModelForCausalLM

        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(
                f"{model_dir} has no config.json: give an HF export directory (write one with "
                "tools/convert_checkpoint.py mcore-to-hf --load CKPT --save DIR)"
            )
        self.model = (
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
            .to(device)
            .eval()
        )
        self.device = device
        self.tokenizer = tokenizer
        # The KV cache's keyword: ``cache`` in transformers >= 5.x, where ``past_key_values`` is a
        # deprecated alias (a FutureWarning and a log line per call); ``past_key_values`` before.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        cfg = self.model.config
        self.max_length = int(cfg.max_position_embeddings)
        vocab = int(cfg.vocab_size)
        if tokenizer.vocab_size > vocab:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary "
                f"is {vocab}: pass the tokenizer the model was trained with"
            )
        self.pad_id = int(tokenizer.eod_id if tokenizer.eod_id is not None else 0)
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        rope = raw.get("rope_parameters") or {}
        self.info = {
            "model_dir": os.path.abspath(model_dir),
            "architectures": raw.get("architectures"),
            "max_position_embeddings": self.max_length,
            "vocab_size": vocab,
            "rope_theta": rope.get("rope_theta", raw.get("rope_theta")),
            "num_parameters": int(sum(p.numel() for p in self.model.parameters())),
        }

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt (stops a row at EOD), ``max_new_tokens`` at most."""
        ids, mask = self._pad(prompts)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        past, done = getattr(out, self._cache_kw), torch.zeros(len(prompts), dtype=torch.bool)
        gen: list[list[int]] = [[] for _ in prompts]
        nxt = out.logits[:, -1].argmax(-1)
        for step in range(max_new_tokens):
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    gen[i].append(int(t))
                    done[i] = t == self.pad_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{self._cache_kw: past},
            )
            past, nxt = getattr(out, self._cache_kw), out.logits[:, -1].argmax(-1)
        return gen

    @torch.no_grad()
    def token_losses(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """Per-token NLL (nats) of each sequence: entry t is the loss of predicting token t + 1."""
        ids, mask = self._pad(sequences)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
        )
        return [nll[i, ids.shape[1] - len(s) :].cpu().numpy() for i, s in enumerate(sequences)]
