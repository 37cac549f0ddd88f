"""Synthetic long-context tasks, generated locally and deterministically (RULER-style).

Every prompt is built at the token level so its length is controlled exactly: the context is made of
separately encoded segments (instruction, repeated noise sentences, needles, question), and the
haystack is cut to fill the budget ``length - max_new_tokens``. The same (task, length, seed, index)
always gives the same sample. Tasks:

* ``needle``: one needle ("The special magic number for KEY is 1234567.") at a given depth of a
  noise haystack (RULER niah_single_1); the grid runs over lengths x depths.
* ``niah_multikey``: one needle plus 3 distractor needles with other keys; asked for one key.
* ``niah_multivalue``: 4 needles with the same key and different values; all values must be named.
* ``variable_tracking``: a chain ``VAR A = 12345. VAR B = VAR A. ...`` scattered in the noise, plus
  a distractor chain; all variables holding the value must be named.
* ``frequent_words``: a long list of pseudo-words where 3 words occur far more often than all
  others; the 3 must be named.

Scoring (``score``) is exact: an answer counts only if it appears as a whole word in the greedy
continuation; a sample is correct when all of its answers appear.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the numbers afterwards.\n"
)
RULER_TASKS = ("niah_multikey", "niah_multivalue", "variable_tracking", "frequent_words")
TASKS = ("needle",) + RULER_TASKS
_SYLLABLES = ["ba", "ko", "ti", "mu", "re", "sa", "no", "vi", "lo", "pe", "du", "ga", "zi", "fo"]


@dataclass
class Sample:
    """One generated task instance.

    Attributes:
        task: Task name.
        length: Target total length (prompt + ``max_new_tokens``), tokens.
        prompt: Token ids of the prompt.
        answers: Strings that must all appear in the continuation.
        max_new_tokens: Greedy tokens to generate.
        depth: Needle depth in [0, 1] (``needle`` only).
        index: Sample number within its (task, length[, depth]) cell.
    """

    task: str
    length: int
    prompt: list[int]
    answers: list[str]
    max_new_tokens: int
    depth: float | None = None
    index: int = 0


def score(prediction: str, answers: list[str]) -> float:
    """Fraction of ``answers`` present as whole words in ``prediction`` (exact string match)."""
    found = sum(1 for a in answers if re.search(rf"(?<!\w){re.escape(a)}(?!\w)", prediction))
    return found / len(answers)


def _rng(seed: int, task: str, length: int, index: int, depth: float | None = None):
    salt = [seed, TASKS.index(task), length, index, 1001 if depth is None else round(depth * 1000)]
    return np.random.default_rng(salt)


def _number(rng) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))


def _word(rng, syllables: int = 3) -> str:
    return "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), syllables))


def _var(rng) -> str:
    return "".join(chr(65 + int(i)) for i in rng.integers(0, 26, 5))


class TaskBuilder:
    """Builds samples with one tokenizer.

    Args:
        tokenizer: ``encode``/``decode``/``bos_id`` (project tokenizer protocol).
    """

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self._bos = [int(tokenizer.bos_id)] if tokenizer.bos_id is not None else []
        self._noise = self._enc(NOISE)

    def _enc(self, text: str) -> list[int]:
        return [int(t) for t in self.tok.encode(text)]

    def _answer_budget(self, answers: list[str]) -> int:
        return len(self._enc(" " + ", ".join(answers) + ".")) + 4

    def _haystack(self, num_tokens: int, inserts: list[tuple[float, list[int]]]) -> list[int]:
        """Noise of ``num_tokens`` minus the inserts, with each insert at its depth (snapped to a
        noise-sentence boundary); inserts keep their order."""
        fill = num_tokens - sum(len(t) for _, t in inserts)
        if fill < 0:
            raise ValueError(
                f"context budget {num_tokens} tokens is too small for the needles "
                f"({num_tokens - fill} tokens); use a larger context length"
            )
        reps = fill // len(self._noise) + 1
        noise = (self._noise * reps)[:fill]
        unit = len(self._noise)
        out, pos = [], 0
        for depth, toks in sorted(inserts, key=lambda x: x[0]):
            cut = min(int(round(depth * fill / unit)) * unit, fill)
            cut = max(cut, pos)
            out += noise[pos:cut] + toks
            pos = cut
        return out + noise[pos:]

    def _assemble(
        self, task, length, index, answers, intro, inserts, question, depth=None, max_new=None
    ) -> Sample:
        max_new = max_new or self._answer_budget(answers)
        head, tail = self._bos + self._enc(intro), self._enc(question)
        budget = length - max_new - len(head) - len(tail)
        prompt = head + self._haystack(budget, inserts) + tail
        return Sample(task, length, prompt, answers, max_new, depth, index)

    def needle(self, length: int, depth: float, seed: int, index: int) -> Sample:
        """The single-needle task at one depth."""
        rng = _rng(seed, "needle", length, index, depth)
        key, value = _word(rng), _number(rng)
        needle = self._enc(f" The special magic number for {key} is {value}. ")
        question = (
            f"\nWhat is the special magic number for {key} mentioned in the provided "
            f"text? The special magic number for {key} mentioned in the provided text is"
        )
        return self._assemble(
            "needle", length, index, [value], NEEDLE_INTRO, [(depth, needle)], question, depth=depth
        )

    def niah_multikey(self, length: int, seed: int, index: int) -> Sample:
        """One needle among 3 distractor needles with other keys."""
        rng = _rng(seed, "niah_multikey", length, index)
        keys = []
        while len(keys) < 4:
            k = _word(rng)
            if k not in keys:
                keys.append(k)
        values = [_number(rng) for _ in keys]
        inserts = [
            (float(rng.random()), self._enc(f" The special magic number for {k} is {v}. "))
            for k, v in zip(keys, values)
        ]
        question = (
            f"\nWhat is the special magic number for {keys[0]} mentioned in the provided "
            f"text? The special magic number for {keys[0]} mentioned in the provided "
            f"text is"
        )
        return self._assemble(
            "niah_multikey", length, index, [values[0]], NEEDLE_INTRO, inserts, question
        )

    def niah_multivalue(self, length: int, seed: int, index: int) -> Sample:
        """Four needles with the same key; all four values are the answer."""
        rng = _rng(seed, "niah_multivalue", length, index)
        key = _word(rng)
        values = sorted({_number(rng) for _ in range(4)})
        inserts = [
            (
                float(rng.random()),
                self._enc(f" One of the special magic numbers for {key} is: {v}. "),
            )
            for v in values
        ]
        question = (
            f"\nWhat are all the special magic numbers for {key} mentioned in the "
            f"provided text? The special magic numbers for {key} mentioned in the "
            f"provided text are"
        )
        return self._assemble(
            "niah_multivalue", length, index, values, NEEDLE_INTRO, inserts, question
        )

    def variable_tracking(self, length: int, seed: int, index: int, hops: int = 4) -> Sample:
        """Two assignment chains of ``hops`` hops; the variables of the first are the answer."""
        rng = _rng(seed, "variable_tracking", length, index)
        names: list[str] = []
        while len(names) < 2 * (hops + 1):
            v = _var(rng)
            if v not in names:
                names.append(v)
        values = [str(int(rng.integers(10_000, 100_000))) for _ in range(2)]
        while values[1] == values[0]:
            values[1] = str(int(rng.integers(10_000, 100_000)))
        inserts = []
        for c in range(2):
            chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
            depths = np.sort(rng.random(hops + 1))
            statements = [f" VAR {chain[0]} = {values[c]}. "] + [
                f" VAR {chain[i]} = VAR {chain[i - 1]}. " for i in range(1, hops + 1)
            ]
            inserts += [(float(d), self._enc(s)) for d, s in zip(depths, statements)]
        intro = (
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
        )
        question = (
            f"\nQuestion: Find all variables that are assigned the value {values[0]} in "
            f"the text above. Answer: According to the chain(s) of variable assignment "
            f"in the text above, {hops + 1} variables are assigned the value "
            f"{values[0]}, they are:"
        )
        return self._assemble(
            "variable_tracking", length, index, names[: hops + 1], intro, inserts, question
        )

    def frequent_words(self, length: int, seed: int, index: int, pool: int = 200) -> Sample:
        """A word list where 3 words occur once per block of 6 and the others rarely."""
        rng = _rng(seed, "frequent_words", length, index)
        words: list[str] = []
        while len(words) < pool + 3:
            w = _word(rng, 4)
            if w not in words:
                words.append(w)
        top, rest = words[:3], words[3:]
        intro = (
            "Below is a numbered list of words. In these words, some appear more often than "
            "others. Memorize the ones that appear most often.\n"
        )
        question = (
            "\nQuestion: What are the 3 most frequently appearing words in the above "
            "list? Answer: The top 3 words appearing most often in the list are:"
        )
        max_new = self._answer_budget(top)
        head, tail = self._bos + self._enc(intro), self._enc(question)
        budget = length - max_new - len(head) - len(tail)
        enc = {w: self._enc(f" {w}") for w in words}
        body: list[int] = []
        u = 0
        num_blocks = 0
        while True:
            block = top + [rest[(u + i) % len(rest)] for i in range(3)]
            order = [block[int(i)] for i in rng.permutation(6)]
            toks = [t for w in order for t in enc[w]]
            if len(body) + len(toks) > budget:
                break
            body += toks
            u += 3
            num_blocks += 1
        if num_blocks < 2 or num_blocks <= -(-3 * num_blocks // len(rest)):
            raise ValueError(
                f"length {length} is too short for frequent_words (fits "
                f"{num_blocks} blocks); use a longer context"
            )
        return Sample("frequent_words", length, head + body + tail, top, max_new, None, index)

    def build(self, task: str, length: int, seed: int, index: int) -> Sample:
        """A RULER task sample by name (``needle`` uses depth 0.5 here)."""
        if task == "needle":
            return self.needle(length, 0.5, seed, index)
        if task not in RULER_TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        return getattr(self, task)(length, seed, index)
