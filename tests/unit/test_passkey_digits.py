"""Passkey documents with a chosen number of digits (``make demo`` uses 2): layout and loss mask
checked against the definition in eval/passkey.py, and the 5-digit default unchanged."""

import numpy as np
import pytest

from megatron_longctx.eval.passkey import (
    DIGIT0,
    FILLER_LOW,
    KEY,
    QUERY,
    eval_prompts,
    passkey_document,
)


@pytest.mark.parametrize("digits", [2, 5])
def test_layout_and_mask(digits):
    rng = np.random.default_rng(0)
    for length in (2 * digits + 3, 32, 257):
        tokens, mask = passkey_document(rng, length, 512, num_digits=digits)
        assert tokens.shape == mask.shape == (length,)
        answer = tokens[-digits:]
        assert ((answer >= DIGIT0) & (answer < DIGIT0 + 10)).all()
        assert tokens[-digits - 1] == QUERY and (tokens == KEY).sum() == 1
        k = int(np.flatnonzero(tokens == KEY)[0])
        assert tokens[k + 1 : k + 1 + digits].tolist() == answer.tolist()
        filler = np.delete(tokens, list(range(k, k + 1 + digits)))[: -digits - 1]
        assert len(filler) == length - 2 * digits - 2 and (filler >= FILLER_LOW).all()
        assert mask.tolist() == [0] * (length - digits) + [1] * digits
    with pytest.raises(ValueError, match=f"needs >= {2 * digits + 3} tokens"):
        passkey_document(rng, 2 * digits + 2, 512, num_digits=digits)


def test_default_is_five_digits_and_prompts_follow():
    a = passkey_document(np.random.default_rng(1), 64, 128)
    b = passkey_document(np.random.default_rng(1), 64, 128, num_digits=5)
    assert (a[0] == b[0]).all() and a[1].sum() == 5
    tokens, answers = eval_prompts(64, 4, 512, seed=3, num_digits=2)
    assert answers.shape == (4, 2) and (tokens[:, -2:] == answers).all()


def test_max_depth_puts_every_key_in_the_first_part():
    length, n = 1024, 20
    tokens, _ = eval_prompts(length, n, 512, seed=0, num_digits=2, max_depth=0.15)
    filler = length - 2 * 2 - 2
    at = (tokens == KEY).int().argmax(1)
    assert (at <= round(0.15 * filler)).all() and at.max() > 0.1 * filler  # spread over [0, .15]
