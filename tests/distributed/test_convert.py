"""HF Llama -> megatron checkpoint conversion checked against transformers' own LlamaForCausalLM.

Random tiny Llamas (GQA 4 heads / 2 groups, rope_theta 1.28e8, vocabulary 500 padded to 512, untied
and tied) are converted at TP x PP in {1, 2} x {1, 2}; each checkpoint is loaded through
``checkpoint.dist.load_checkpoint`` at its own and at other layouts (dist_checkpointing reshards)
and the logits over the real 500 entries must equal transformers' (fp32, max abs diff <= 1e-4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_longctx.testing.distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, SEQ, BATCH = 500, 24, 2
ROPE_THETA = 1.28e8


def make_hf_llama(path: str, *, tied: bool, seed: int = 0, vocab_size: int = VOCAB) -> str:
    """A random tiny LlamaForCausalLM saved with save_pretrained (safetensors) + tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm mapping shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    return path


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def megatron_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, vocab_size] on the last pipeline stage (None elsewhere): the
    hidden state goes stage to stage by send/recv, vocab-parallel logits are gathered over TP."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, s = tokens.shape
    position_ids = torch.arange(s).expand(b, s)
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(s, b, model.config.hidden_size)
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(tokens, position_ids, None)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
    tp = ps.get_tensor_model_parallel_world_size()
    parts = [torch.empty_like(out) for _ in range(tp)]
    dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)[..., :vocab_size]


def _convert_and_compare(rank, world, cases, tokens):
    """cases: (hf_dir, save_dir, convert_layout | None, load_layouts, reference logits)."""
    import torch.nn.functional as F

    from megatron_longctx.checkpoint.dist import iteration_dir, load_checkpoint, read_state
    from megatron_longctx.checkpoint.hf import hf_to_mcore_collective
    from megatron_longctx.checkpoint.hf.config_map import model_config_from_dict
    from megatron_longctx.model.build import build_gpt_model
    from megatron_longctx.parallel.layout import ParallelLayout
    from megatron_longctx.runtime.distributed import initialize_model_parallel

    import logging

    warnings = []

    class _Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("megatron.core.dist_checkpointing").addHandler(_Collect(logging.WARNING))
    report = []
    for hf_dir, save_dir, convert, loads, ref in cases:
        if convert is not None:
            hf_to_mcore_collective(hf_dir, save_dir, *convert)
        ckpt = iteration_dir(save_dir, 0)
        cfg = model_config_from_dict(read_state(ckpt)["state"]["model"])
        for tp, pp in loads:
            layout = ParallelLayout(tp, pp, 1)
            initialize_model_parallel(layout)
            model = build_gpt_model(cfg, layout, backend="local").eval()
            load_checkpoint(ckpt, [model], expect_model=cfg.to_dict())
            logits = megatron_logits(model, tokens, cfg.vocab_size)
            if logits is None:
                continue
            diff = (logits - ref).abs().max().item()
            # KL(transformers || megatron) per token, in fp64 so fp32 rounding of log_softmax
            # does not dominate the tiny value
            lp, lq = F.log_softmax(ref.double(), -1), F.log_softmax(logits.double(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
            report.append((os.path.basename(save_dir), convert, (tp, pp), diff, kl))
    return report, warnings


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "untied": make_hf_llama(str(root / "untied"), tied=False, seed=0),
        "tied": make_hf_llama(str(root / "tied"), tied=True, seed=1),
    }


@pytest.fixture(scope="module")
def cli_tp2pp2(hf_dirs, tmp_path_factory):
    """hf-to-mcore through the CLI at TP 2 x PP 2: the tool spawns its 4 gloo processes itself."""
    save = str(tmp_path_factory.mktemp("ckpt") / "untied_tp2pp2")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "convert_checkpoint.py"),
            "hf-to-mcore",
            "--hf-dir",
            hf_dirs["untied"],
            "--save",
            save,
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return save


@pytest.fixture(scope="module")
def converted(hf_dirs, cli_tp2pp2, tmp_path_factory):
    """One 2-process launch: converts at TP1/PP1, TP2/PP1, TP1/PP2 (collective API), loads every
    checkpoint (and the CLI's TP2/PP2 one) at two layouts, compares logits with transformers."""
    root = tmp_path_factory.mktemp("ckpt")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    refs = {k: hf_logits(d, tokens) for k, d in hf_dirs.items()}
    saves = {name: str(root / name) for name in ("untied_tp1pp1", "untied_tp2pp1", "tied_tp1pp2")}
    cases = [
        (hf_dirs["untied"], saves["untied_tp1pp1"], (1, 1), [(1, 1), (2, 1)], refs["untied"]),
        (hf_dirs["untied"], saves["untied_tp2pp1"], (2, 1), [(2, 1), (1, 2)], refs["untied"]),
        (hf_dirs["tied"], saves["tied_tp1pp2"], (1, 2), [(1, 2), (2, 1)], refs["tied"]),
        (hf_dirs["untied"], cli_tp2pp2, None, [(2, 1), (1, 2)], refs["untied"]),
    ]
    results = run_distributed(_convert_and_compare, 2, args=(cases, tokens), timeout=200)
    saves["untied_tp2pp2"] = cli_tp2pp2
    # every rank saves the same common state (megatron warns "Rank 1 common state dict differs
    # from rank 0 ..." otherwise; the tokenizer file list used to be rank 0's only)
    assert not [w for _, warns in results for w in warns if "differs" in w]
    return [row for rank_rows, _ in results for row in rank_rows], saves


@pytest.mark.timeout(280)
def test_hf_to_mcore_logits_match_transformers(converted):
    rows, _ = converted
    for name, convert, load, diff, kl in rows:
        print(
            f"{name:16s} converted at {convert} loaded at {load}: max|diff| {diff:.2e} KL {kl:.2e}"
        )
        assert diff <= 1e-4, (name, load, diff)
        assert kl <= 1e-8, (name, load, kl)
    seen = {(name, load) for name, _, load, _, _ in rows}
    assert len(seen) == 8, seen


def _assert_same_tensors(src: str, dst: str) -> int:
    from safetensors import safe_open

    def tensors(d):
        index = os.path.join(d, "model.safetensors.index.json")
        files = (
            sorted(set(json.load(open(index))["weight_map"].values()))
            if os.path.exists(index)
            else ["model.safetensors"]
        )
        out = {}
        for file in files:
            with safe_open(os.path.join(d, file), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        return out

    a, b = tensors(src), tensors(dst)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    return len(a)


@pytest.mark.timeout(120)
def test_round_trip_is_bitwise_and_loads_in_transformers(hf_dirs, converted, tmp_path):
    from transformers import AutoConfig, LlamaForCausalLM

    from megatron_longctx.checkpoint.hf import ConversionError, mcore_to_hf
    from megatron_longctx.checkpoint.hf.config_map import hf_rope_theta

    _, saves = converted
    out = str(tmp_path / "export_untied")
    proc = subprocess.run(  # through the CLI, sharded (index + several files)
        [
            sys.executable,
            os.path.join(REPO, "tools", "convert_checkpoint.py"),
            "mcore-to-hf",
            "--load",
            saves["untied_tp2pp2"],
            "--save",
            out,
            "--max-shard-size",
            "100KB",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 2
    tied_out = str(tmp_path / "export_tied")
    summary = mcore_to_hf(saves["tied_tp1pp2"], tied_out)  # library API, one file
    assert summary["files"] == ["model.safetensors"]
    for src, dst in ((hf_dirs["untied"], out), (hf_dirs["tied"], tied_out)):
        assert _assert_same_tensors(src, dst) > 0
        old, new = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(dst)
        assert hf_rope_theta(new) == hf_rope_theta(old) == ROPE_THETA
        for key in (
            "max_position_embeddings",
            "vocab_size",
            "num_key_value_heads",
            "tie_word_embeddings",
            "rms_norm_eps",
            "eos_token_id",
            "bos_token_id",
        ):
            assert getattr(new, key) == getattr(old, key), key
        assert sorted(f for f in os.listdir(dst) if f.startswith(("tokenizer", "special"))) == [
            "special_tokens_map.json",
            "tokenizer_config.json",
        ]
        model = LlamaForCausalLM.from_pretrained(dst, local_files_only=True)
        assert model.config.tie_word_embeddings == old.tie_word_embeddings
    from megatron_longctx.checkpoint.hf import hf_to_mcore

    with pytest.raises(ConversionError, match="already holds checkpoint"):
        hf_to_mcore(hf_dirs["untied"], saves["untied_tp1pp1"])
    # an output dir holding another model is refused; --overwrite replaces it, stale shards go
    with pytest.raises(ConversionError, match="different model"):
        mcore_to_hf(saves["tied_tp1pp2"], out)
    mcore_to_hf(saves["tied_tp1pp2"], out, overwrite=True, verify="rope")
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]
    # a training-style export: dtype cast, trained length and theta come from the stored config
    bf16 = mcore_to_hf(saves["untied_tp1pp1"], str(tmp_path / "bf16"), dtype="bf16")
    assert bf16["dtype"] == "bfloat16"
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "bf16"), local_files_only=True)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
