"""An SFT stage (type: sft, chat data with assistant-only loss masks) through the real trainer
(torchrun, 2 CPU processes, DP 2): every step's loss is averaged over exactly the assistant-label
tokens that the loader's masks select, computed here independently of the trainer."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from megatron_longctx.data.index_cache import build_mixture_index
from megatron_longctx.data.loader import MixtureLoader
from megatron_longctx.data.mixture import load_mixture_yaml
from megatron_longctx.data.sft import SFTConfig, preprocess_sft
from tests.integration.run_utils import ROOT, launch, metrics

S, GB, STEPS = 128, 4, 3
TOPICS = ["rivers", "mountains", "compilers", "bread", "chess", "tides", "owls", "glass"]


def conversations():
    for i, topic in enumerate(TOPICS * 6):
        msgs = [
            {"role": "user", "content": f"Tell me one fact about {topic}, number {i}."},
            {"role": "assistant", "content": f"Here is fact {i} about {topic}: it is real."},
        ]
        if i % 3 == 0:
            msgs = (
                [{"role": "system", "content": "You are terse."}]
                + msgs
                + [
                    {"role": "user", "content": "And another?"},
                    {"role": "assistant", "content": f"{topic} again, briefly."},
                ]
            )
        yield {"messages": msgs}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from megatron_longctx.data.preprocess.sample_corpus import make_sample_corpus
    from megatron_longctx.data.preprocess.train_spm import train_sentencepiece

    root = tmp_path_factory.mktemp("sft_run")
    make_sample_corpus(str(root / "corpus"), scale=0.05)
    spm = train_sentencepiece(
        str(root / "corpus"), str(root / "spm"), vocab_size=500, num_threads=1
    )
    data = root / "data"
    data.mkdir()
    with open(root / "chat.jsonl", "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in conversations())
    preprocess_sft(
        SFTConfig(str(root / "chat.jsonl"), str(data / "ultrachat"), "SentencePieceTokenizer", spm)
    )
    recipe = {
        "name": "tiny_sft",
        "seed": 3,
        "model": {"preset": "tiny", "vocab_size": 512, "num_layers": 2},
        "data": {"cache_dir": "${LONGCTX_RUN}/cache"},
        "checkpoint": {"save_dir": "${LONGCTX_RUN}/checkpoints", "interval": 100, "keep_last": 1},
        "logging": {"run_dir": "${LONGCTX_RUN}", "interval": 1, "wandb_mode": "disabled"},
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "seq_length": S,
                "global_batch_size": GB,
                "micro_batch_size": 1,
                "lr": 2.0e-5,
                "steps": STEPS,
                "warmup_ratio": 0.34,
                "mixture": str(ROOT / "examples" / "mixtures" / "sft_ultrachat.yaml"),
            }
        ],
    }
    config = root / "tiny_sft.yaml"
    config.write_text(yaml.safe_dump(recipe))
    run = root / "run"
    proc = launch(config, run, {"long": str(data / "ultrachat")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run, data


@pytest.mark.timeout(300)
def test_sft_stage_trains_on_assistant_tokens_only(sft_run, monkeypatch):
    run, data = sft_run
    recs = [r for r in metrics(run) if r["stage"] == "sft"]
    assert len(recs) == STEPS and all(math.isfinite(r["loss"]) for r in recs)
    monkeypatch.setenv("LONGCTX_DATA", str(data))
    spec = load_mixture_yaml(ROOT / "examples" / "mixtures" / "sft_ultrachat.yaml")
    index = build_mixture_index(spec, S, STEPS * GB, vocab_size=512)
    loader = MixtureLoader(index, GB, GB, 0, 1)
    for rec in recs:
        batch = next(loader)
        masked = int(batch["loss_mask"].sum())
        assert 0 < masked < GB * S * 0.8  # user/system/header labels are excluded
        assert rec["loss_tokens"] == masked
