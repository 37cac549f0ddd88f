"""Starting from a real pretrained model the way users do, on a tiny stand-in with its traits
(``megatron_longctx/testing/hf_model.py``: tied embeddings, 9 heads / 3 KV heads, a ChatML
template whose EOS is the end-of-turn ``<|im_end|>``, a ``Digits`` pre-tokenizer). No process is
started here; the converted-checkpoint and training checks are in
tests/integration/test_pretrained_model.py.

References: transformers' own ``AutoConfig`` / ``AutoTokenizer`` / ``apply_chat_template`` (with
``{% generation %}`` marks, its assistant-token mask), never the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_longctx.testing.hf_model import CHATML, ENDOFTEXT, IM_END, make_tiny_instruct_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    return make_tiny_instruct_model(tmp_path_factory.mktemp("smol") / "SmolLM2-tiny")


def _complete(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    (path / "COMPLETE.json").write_text("{}")
    return path


def test_init_from_accepts_what_the_converter_wrote_and_names_bad_paths(tmp_path, hf_model):
    from megatron_longctx.checkpoint.init_from import InitFromError, resolve_checkpoint

    root = tmp_path / "smol_mcore"  # hf-to-mcore --save root: iter_0000000 + hf_tokenizer
    first = _complete(root / "iter_0000000")
    (root / "hf_tokenizer").mkdir()
    assert resolve_checkpoint(root) == first  # the --save folder, as the README says
    assert resolve_checkpoint(first) == first  # or the iter_* folder
    newer = _complete(root / "iter_0000040")
    assert resolve_checkpoint(root) == newer  # a training run's save_dir: its newest
    torn = root / "iter_0000050"
    torn.mkdir()
    (torn / "metadata.json").write_text("{}")
    assert resolve_checkpoint(root) == newer  # an interrupted save is never picked
    with pytest.raises(InitFromError, match="iter_0000050 has no COMPLETE.json: it was interr"):
        resolve_checkpoint(torn)
    with pytest.raises(InitFromError, match=r"init_from .*nowhere does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    with pytest.raises(InitFromError) as err:  # an HF dir: the one command to run
        resolve_checkpoint(hf_model)
    assert f"hf-to-mcore --hf-dir {hf_model} --save" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InitFromError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path / "empty")


def test_trainer_names_a_missing_init_from_before_any_rank_starts(tmp_path, capsys, monkeypatch):
    import megatron_longctx.training.loop as loop
    from megatron_longctx.train import main

    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setenv("LONGCTX_RUN", str(tmp_path))
    monkeypatch.setenv("LONGCTX_DATA", str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the recipe's stage 2 has CP 2
    rc = main(
        ["--config", str(ROOT / "examples/tiny_test.yaml"), f"stages.0.init_from={tmp_path}/x"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and f"init_from {tmp_path}/x does not exist" in err[0]


def test_one_variable_name_with_the_old_one_still_working(monkeypatch, caplog):
    from megatron_longctx.config.schema import ExperimentConfig

    recipe = ROOT / "examples/prolong_64k.yaml"
    monkeypatch.setenv("LONGCTX_INIT_FROM", "/ckpt/new")
    assert ExperimentConfig.load(recipe).stages[0].init_from == "/ckpt/new"
    monkeypatch.delenv("LONGCTX_INIT_FROM")
    monkeypatch.setenv("LONGCTX_INIT", "/ckpt/old")
    assert ExperimentConfig.load(recipe).stages[0].init_from == "/ckpt/old"
    assert "LONGCTX_INIT is deprecated; set LONGCTX_INIT_FROM" in caplog.text
    launcher = (ROOT / "launch/common.sh").read_text()
    assert "LONGCTX_INIT_FROM" in launcher and "${LONGCTX_INIT:" not in launcher


def test_converter_checks_size_rules_before_spawning(tmp_path, hf_model, capsys, monkeypatch):
    import importlib

    from tools.convert_checkpoint import main

    h2m = importlib.import_module("megatron_longctx.checkpoint.hf.hf_to_mcore")

    monkeypatch.setattr(h2m, "spawn_ranks", lambda *a, **k: pytest.fail("ranks were spawned"))
    # a user's process (no torchrun): another test of this session may have initialised a group
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    save = tmp_path / "out"
    args = ["hf-to-mcore", "--hf-dir", str(hf_model), "--save", str(save)]
    rc = main([*args, "--tensor-model-parallel-size", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "attention heads 9 are not divisible by TP 2" in err[0]
    assert main([*args, "--pipeline-model-parallel-size", "3"]) == 2
    assert "layers 2 are not divisible by PP 3" in capsys.readouterr().err
    assert not save.exists()


def test_model_section_from_an_hf_dir_with_overrides(hf_model):
    from transformers import AutoConfig

    from megatron_longctx.config.loading import from_dict
    from megatron_longctx.config.schema import ExperimentConfig

    hf = AutoConfig.from_pretrained(hf_model)
    stage = {"name": "s", "seq_length": 128, "global_batch_size": 2, "steps": 1}
    model = {"from_checkpoint": str(hf_model), "norm_eps": 1e-6}
    m = from_dict(ExperimentConfig, {"name": "x", "stages": [stage], "model": model}).model_config()
    assert (m.hidden_size, m.ffn_hidden_size, m.num_layers) == (
        hf.hidden_size,
        hf.intermediate_size,
        hf.num_hidden_layers,
    )
    assert (m.num_attention_heads, m.num_query_groups) == (9, hf.num_key_value_heads)
    assert m.vocab_size == hf.vocab_size and m.tie_word_embeddings is True
    assert m.rope_theta == hf.rope_parameters["rope_theta"] and m.norm_eps == 1e-6  # overridden


def _write_jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_eod_token_defaults_to_end_of_text_and_is_recorded(tmp_path, hf_model):
    from transformers import AutoTokenizer

    from megatron_longctx.data.preprocess.pipeline import PreprocessConfig, preprocess
    from megatron_longctx.data.sources import read_document_table

    hf = AutoTokenizer.from_pretrained(hf_model)
    assert hf.eos_token == IM_END  # an instruct tokenizer: EOS is its end-of-turn token
    src = _write_jsonl(tmp_path / "in.jsonl", ["Counting 1, 2, 3.", "Another doc of 42 words."])
    cases = {None: ENDOFTEXT, IM_END: IM_END, "0": hf.convert_ids_to_tokens(0)}
    for i, (spec, want) in enumerate(cases.items()):
        prefix = str(tmp_path / f"out{i}")
        report = preprocess(
            PreprocessConfig(
                src, prefix, "HuggingFaceTokenizer", str(hf_model), append_eod=True, eod_token=spec
            )
        )
        table = read_document_table(prefix + "_text_document")
        data = np.fromfile(prefix + "_text_document.bin", dtype=table.dtype)
        ends = [int(data[o + n - 1]) for o, n in zip(table.doc_offsets, table.doc_lengths)]
        assert ends == [hf.convert_tokens_to_ids(want)] * 2
        stats = report.stats["text"]
        assert (stats["eod_token"], stats["eod_id"]) == (want, hf.convert_tokens_to_ids(want))
    kw = {"append_eod": True, "eod_token": "<nope>"}
    with pytest.raises(ValueError, match="--eod-token '<nope>' is not a token"):
        bad = str(tmp_path / "bad")
        preprocess(PreprocessConfig(src, bad, "HuggingFaceTokenizer", str(hf_model), **kw))


# The tiny model's ChatML template with transformers' generation marks (its reference mask).
CHATML_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("content", ["", "  "])
def test_empty_assistant_turn_keeps_its_end_of_turn_in_the_loss(tmp_path, hf_model, content):
    from transformers import AutoTokenizer

    from megatron_longctx.data.chat_template import TokenizerChatTemplate

    assert CHATML_MARKED != CHATML
    hf = AutoTokenizer.from_pretrained(hf_model)
    conv = [
        {"role": "user", "content": "Say nothing."},
        {"role": "assistant", "content": content},
        {"role": "user", "content": "Now say 42."},
        {"role": "assistant", "content": "42"},
    ]
    ref = hf.apply_chat_template(
        conv,
        chat_template=CHATML_MARKED,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert hf.apply_chat_template(conv, tokenize=False) == hf.apply_chat_template(
        conv, chat_template=CHATML_MARKED, tokenize=False
    )
    tokens, mask = TokenizerChatTemplate(hf).render(conv)
    assert tokens.tolist() == ref["input_ids"]
    assert mask.tolist() == ref["assistant_masks"]
    im_end = hf.convert_tokens_to_ids(IM_END)
    assert int(mask[tokens == im_end].sum()) == 2  # both assistant turns' end-of-turn


def test_preprocess_sft_creates_the_output_folder(tmp_path, hf_model):
    from megatron_longctx.data.sft import SFTConfig, preprocess_sft

    chat = tmp_path / "chat.jsonl"
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello 7."}]
    chat.write_text(json.dumps({"messages": conv}) + "\n")
    prefix = tmp_path / "dir" / "sub" / "chat"
    config = SFTConfig(str(chat), str(prefix), "HuggingFaceTokenizer", str(hf_model))
    report = preprocess_sft(config)
    assert report.num_conversations == 1
    assert Path(report.text_prefix + ".bin").is_file()
    assert Path(f"{prefix}_sft_stats.json").is_file()
