"""Evaluation honesty: an oracle that reads the prompt scores 100%, a random tiny Llama scores ~0;
task generation is deterministic; lengths past max_position_embeddings are skipped and recorded."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from megatron_longctx.data.preprocess.tokenizer import load_tokenizer
from megatron_longctx.eval import EvalSettings, evaluate, evaluate_model
from megatron_longctx.eval.loss_position import bucket_edges
from megatron_longctx.eval.tasks import RULER_TASKS, TaskBuilder, score
from megatron_longctx.testing.data import write_indexed

LENGTHS = [256, 512]


class Oracle:
    """Same interface as HFEvalModel; answers by reading the prompt text (a hand-built solver)."""

    max_length = 4096
    info = {"model_dir": "oracle"}

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _answer(self, text: str) -> str:
        if "most frequently appearing words" in text:
            body = text.split("appear most often.", 1)[1].split("Question:", 1)[0]
            return ", ".join(w for w, _ in Counter(body.split()).most_common(3))
        if m := re.search(r"assigned the value (\d+) in", text):
            owner = {a: b for a, b in re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", text)}
            names = [v for v in owner if v and self._root(owner, v) == m.group(1)]
            return ", ".join(names)
        if m := re.search(r"What are all the special magic numbers for (\w+)", text):
            return ", ".join(re.findall(rf"magic numbers for {m.group(1)} is: (\d+)", text))
        key = re.search(r"What is the special magic number for (\w+)", text).group(1)
        return re.search(rf"magic number for {key} is (\d+)", text).group(1)

    @staticmethod
    def _root(owner, v):
        while v in owner:
            v = owner[v]
        return v

    def generate(self, prompts, max_new_tokens):
        return [
            self.tokenizer.encode(" " + self._answer(self.tokenizer.decode(p)) + ".")[
                :max_new_tokens
            ]
            for p in prompts
        ]

    def token_losses(self, sequences):
        return [np.zeros(len(s) - 1) for s in sequences]


@pytest.fixture(scope="module")
def tok(spm_model):
    return load_tokenizer("SentencePieceTokenizer", spm_model)


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory, spm_model):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    out = tmp_path_factory.mktemp("random_llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    return str(out)


def test_generation_is_deterministic_and_exact_length(tok):
    builder = TaskBuilder(tok)
    for task in ("needle",) + RULER_TASKS:
        a, b = builder.build(task, 512, 3, 1), builder.build(task, 512, 3, 1)
        assert a.prompt == b.prompt and a.answers == b.answers
        assert builder.build(task, 512, 4, 1).prompt != a.prompt  # the seed matters
        assert len(a.prompt) + a.max_new_tokens <= 512
        if task != "frequent_words":
            assert len(a.prompt) + a.max_new_tokens == 512
    deep, shallow = builder.needle(512, 1.0, 0, 0), builder.needle(512, 0.0, 0, 0)
    text_deep, text_shallow = tok.decode(deep.prompt), tok.decode(shallow.prompt)
    assert text_deep.index("special magic number for") > text_shallow.index(
        "special magic number for"
    )


def test_score_is_exact_whole_word():
    assert score("1234567.", ["1234567"]) == 1.0
    assert score("12345678", ["1234567"]) == 0.0
    assert score("AB, CD", ["AB", "CD", "EF"]) == pytest.approx(2 / 3)


def test_oracle_scores_100_percent(tok, tmp_path):
    settings = EvalSettings(
        context_lengths=LENGTHS,
        depths=[0.0, 0.5, 1.0],
        num_samples=3,
        tasks=["needle", "ruler"],
        batch_size=4,
    )
    res = evaluate_model(Oracle(tok), str(tmp_path), settings)
    assert res["needle"]["accuracy"] == 1.0
    assert all(v == 1.0 for row in res["needle"]["grid"] for v in row)
    for task in RULER_TASKS:
        assert res["ruler"][task]["accuracy"] == 1.0, res["ruler"][task]["samples"][0]
    assert (tmp_path / "needle_heatmap.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved["seed"] == 0 and saved["lengths"]["evaluated"] == LENGTHS
    assert "| needle | 1.00 | 1.00 |" in (tmp_path / "report.md").read_text()


def test_random_llama_scores_at_chance_and_skips_long(tok, random_llama, tmp_path, spm_model):
    data = write_indexed(tmp_path / "held_out", [700, 300, 900, 650], vocab=1000, seed=3)
    settings = {
        "context_lengths": [256, 512, 1024],
        "depths": [0.0, 1.0],
        "num_samples": 2,
        "ruler_tasks": ["niah_multikey", "variable_tracking"],
        "batch_size": 4,
        "loss_data": [data],
        "loss_num_documents": 3,
        "num_position_buckets": 5,
    }
    res = evaluate(
        random_llama,
        str(tmp_path / "out"),
        settings,
        tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=spm_model,
    )
    assert res["lengths"]["evaluated"] == [256, 512]
    assert res["lengths"]["skipped"][0]["length"] == 1024
    assert "max_position_embeddings 512" in res["lengths"]["skipped"][0]["reason"]
    assert res["needle"]["accuracy"] == 0.0
    assert all(r["accuracy"] == 0.0 for r in res["ruler"].values())
    assert res["needle"]["grid"][0][2] is None  # the skipped column
    loss = res["loss_by_position"]
    assert loss["length"] == 512 and len(loss["documents"]) == 3
    assert loss["bucket_edges"][0] == 0 and loss["bucket_edges"][-1] == 511
    assert abs(loss["mean_loss"] - np.log(1000)) < 0.5  # a random model: ~uniform over the vocab
    assert (tmp_path / "out" / "loss_by_position.png").exists()
    assert res["model"]["max_position_embeddings"] == 512


def test_batched_equals_unbatched(tok, random_llama):
    from megatron_longctx.eval.model import HFEvalModel

    model = HFEvalModel(random_llama, tok)
    builder = TaskBuilder(tok)
    prompts = [builder.needle(256, 0.5, 0, 0).prompt, builder.frequent_words(300, 0, 0).prompt]
    assert len(prompts[0]) != len(prompts[1])  # left padding is exercised
    together = model.generate(prompts, 6)
    alone = [model.generate([p], 6)[0] for p in prompts]
    assert together == alone
    la, lb = model.token_losses(prompts), [model.token_losses([p])[0] for p in prompts]
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_bad_settings_and_inputs(tmp_path, tok):
    with pytest.raises(ValueError, match="unknown eval tasks"):
        EvalSettings(tasks=["mmlu"])
    with pytest.raises(ValueError, match="needs held-out data"):
        EvalSettings(tasks=["loss"])
    with pytest.raises(ValueError, match="unknown eval settings"):
        EvalSettings.from_dict({"lengths": [1]})
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        evaluate(str(tmp_path), str(tmp_path / "o"), {"tasks": ["needle"]})
    assert bucket_edges(513, 4, "linear") == [0, 128, 256, 384, 512]


def test_tasks_below_their_length_are_not_run_and_said_once(tok, tmp_path, caplog):
    """A task is run only from the length it needs (found by search, checked here against the
    builder itself); one log line names every task's need; the report leaves out a task that ran
    at no length; ``extrapolate`` evaluates past max_position_embeddings."""

    class Short(Oracle):
        max_length = 200

    settings = EvalSettings(
        context_lengths=[200, 1024],
        depths=[0.5],
        num_samples=1,
        tasks=["needle", "ruler"],
        ruler_tasks=["niah_multikey", "variable_tracking"],
        extrapolate=True,
    )
    with caplog.at_level("INFO", logger="megatron_longctx.eval.runner"):
        res = evaluate_model(Short(tok), str(tmp_path), settings)
    needs = res["lengths"]["task_min_length"]
    builder = TaskBuilder(tok)
    for task, n in needs.items():
        builder.build(task, n, 0, 0)  # runs at its length ...
        with pytest.raises(ValueError, match="too small"):
            builder.build(task, n - 1, 0, 0)  # ... and not one token below
    assert needs["needle"] <= 200 < needs["niah_multikey"] < needs["variable_tracking"] <= 1024
    assert res["lengths"]["evaluated"] == [200, 1024] and not res["lengths"]["skipped"]
    assert res["ruler"]["niah_multikey"]["by_length"] == {"200": None, "1024": 1.0}
    assert res["lengths"]["too_short_for_task"] == []  # nothing was even attempted below
    said = [r.getMessage() for r in caplog.records if "each task needs" in r.getMessage()]
    assert len(said) == 1 and f"niah_multikey >= {needs['niah_multikey']}" in said[0]
    report = (tmp_path / "report.md").read_text()
    assert "| niah_multikey | - | 1.00 |" in report
    assert f"niah_multikey >= {needs['niah_multikey']} tokens" in report
