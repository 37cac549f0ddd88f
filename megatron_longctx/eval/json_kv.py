"""HELMET's JSON key-value retrieval (``json_kv``), built at the token level like eval/tasks.py.

A long JSON object of random UUID keys and UUID values fills the context; the question asks for
the value of one key (HELMET, Yen et al. 2024, "recall" category, after Liu et al.'s "Lost in the
Middle" KV task)::

    Extract the value corresponding to the specified key in the JSON object below.

    JSON data:
    {"<uuid>": "<uuid>", "<uuid>": "<uuid>", ...}

    Key: "<uuid>"
    Corresponding value:

The answer is the value (HELMET scores substring exact match of the generation; the in-process
evaluation scores it by teacher forcing). Each pair is encoded on its own, so the prompt length is
controlled exactly: as many pairs as fit ``length - answer budget``; the asked pair sits at a
seeded uniform position. The same (length, seed, index) always gives the same sample.
"""

from __future__ import annotations

import uuid

import numpy as np

from megatron_longctx.eval.tasks import Sample

INTRO = (
    "Extract the value corresponding to the specified key in the JSON object below.\n\n"
    "JSON data:\n{"
)
TASK = "json_kv"
_SALT = 7013


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def json_kv(tokenizer, length: int, seed: int, index: int) -> Sample:
    """One JSON-KV sample of at most ``length`` tokens (prompt + answer budget).

    Args:
        tokenizer: ``encode`` / ``bos_id`` (project tokenizer protocol).

    Raises:
        ValueError: ``length`` is too short for two pairs and the question.
    """
    rng = np.random.default_rng([seed, _SALT, length, index])
    enc = lambda text: [int(t) for t in tokenizer.encode(text)]  # noqa: E731
    bos = [int(tokenizer.bos_id)] if tokenizer.bos_id is not None else []
    key, value = _uuid(rng), _uuid(rng)  # the asked pair
    head = bos + enc(INTRO)
    tail = enc(f'}}\n\nKey: "{key}"\nCorresponding value:')
    max_new = len(enc(" " + value)) + 4
    budget = length - max_new - len(head) - len(tail)
    # pairs after the first start with ", " (valid JSON); the asked pair's slot is drawn first
    pairs = [(key, value)]
    used = len(enc(f'"{key}": "{value}"'))
    while True:
        k, v = _uuid(rng), _uuid(rng)
        cost = len(enc(f', "{k}": "{v}"'))
        if used + cost + 2 > budget:  # + 2: the asked pair may gain the ", " prefix
            break
        pairs.append((k, v))
        used += cost
    if len(pairs) < 2:
        raise ValueError(
            f"length {length} is too short for json_kv (fits {len(pairs)} key-value pairs); "
            "use a longer context"
        )
    order = rng.permutation(len(pairs))
    asked = int(np.flatnonzero(order == 0)[0])
    body: list[int] = []
    for n, i in enumerate(order):
        k, v = pairs[int(i)]
        body += enc(f'"{k}": "{v}"' if n == 0 else f', "{k}": "{v}"')
    prompt = head + body + tail
    if len(prompt) + max_new > length:  # the ", " prefix cost more than 2 tokens: drop a pair
        raise ValueError(f"json_kv could not fit length {length}; use a longer context")
    depth = asked / max(len(pairs) - 1, 1)
    return Sample(TASK, length, prompt, [value], max_new, round(depth, 3), index)
