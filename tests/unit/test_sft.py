"""SFT data: chat-template loss masks vs a hand computation, bad records, packed loader masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_longctx.data.index_cache import build_mixture_index
from megatron_longctx.data.loader import MixtureLoader
from megatron_longctx.data.mixture import MixtureComponent, MixtureError, MixtureSpec
from megatron_longctx.data.preprocess.tokenizer import load_tokenizer
from megatron_longctx.data.sft import ChatTemplate, SFTConfig, SFTError, preprocess_sft
from megatron_longctx.data.sources import DataSourceError, read_document_table

CONVS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two, three."},
        {"role": "user", "content": "Now backwards."},
        {"role": "assistant", "content": "Three, two, one."},
    ],
]


def write_chat(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def read_docs(prefix: str) -> list[np.ndarray]:
    table = read_document_table(prefix)
    data = np.fromfile(prefix + ".bin", dtype=table.dtype)
    return [data[o : o + n] for o, n in zip(table.doc_offsets, table.doc_lengths)]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, spm_model):
    root = tmp_path_factory.mktemp("sft")
    src = write_chat(root / "chat.jsonl", [{"messages": m} for m in CONVS * 15])
    report = preprocess_sft(
        SFTConfig(str(src), str(root / "chat"), "SentencePieceTokenizer", spm_model)
    )
    return root, report


def hand_rendering(tok, messages):
    """The template written out by hand: (tokens, mask) per segment."""
    eot = tok.eod_id
    tokens, mask = [tok.bos_id], [0]
    for m in messages:
        head = tok.encode(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n")
        body = tok.encode(m["content"])
        a = int(m["role"] == "assistant")
        tokens += head + body + [eot]
        mask += [0] * len(head) + [a] * len(body) + [a]
    return tokens, mask


def test_loss_mask_matches_hand_computation(sft_data, spm_model):
    root, report = sft_data
    tok = load_tokenizer("SentencePieceTokenizer", spm_model)
    texts, masks = read_docs(report.text_prefix), read_docs(report.mask_prefix)
    assert report.num_conversations == len(texts) == len(masks) == 30
    for i, conv in enumerate(CONVS * 2):
        want_tokens, want_mask = hand_rendering(tok, conv)
        assert texts[i].tolist() == want_tokens
        assert masks[i].tolist() == want_mask
    # exact positions for conversation 0: only "Paris." and the final EOT are trained on
    t, m = texts[0].tolist(), masks[0].tolist()
    on = [i for i, v in enumerate(m) if v]
    paris = tok.encode("Paris.")
    assert on == list(range(len(t) - len(paris) - 1, len(t)))
    assert tok.decode(t[on[0] : on[-1]]) == "Paris."
    assert t[-1] == tok.eod_id
    assert report.num_assistant_tokens == sum(int(x.sum()) for x in masks)


def test_template_uses_single_eot_token_when_present():
    class Tok:  # the Llama-3 case: <|eot_id|> is one token; no BOS
        eod_id, bos_id = 0, None

        def encode(self, text):
            return [7] if text == "<|eot_id|>" else [ord(c) for c in text]

    tokens, mask = ChatTemplate(Tok()).render(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bc"}]
    )
    head = len("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokens[-3:].tolist() == [98, 99, 7] and mask[-3:].tolist() == [1, 1, 1]
    assert mask.sum() == 3 and mask[-3 - head : -3].sum() == 0


BAD = [
    ("{not json", "malformed_json"),
    ('["a list"]', "not_an_object"),
    ({"text": "no messages"}, "no_messages"),
    ({"messages": []}, "empty_conversation"),
    (
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "unknown_role",
    ),
    ({"messages": [{"role": "user", "content": 3}]}, "bad_message"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no_assistant_turn"),
]


@pytest.mark.parametrize("record,reason", BAD, ids=[r for _, r in BAD])
def test_bad_record_fails_with_file_and_line(tmp_path, spm_model, record, reason):
    src = write_chat(tmp_path / "c.jsonl", [{"messages": CONVS[0]}, record])
    with pytest.raises(SFTError, match=rf"c\.jsonl:2: {reason}: .*--on-error skip"):
        preprocess_sft(
            SFTConfig(str(src), str(tmp_path / "out"), "SentencePieceTokenizer", spm_model)
        )
    assert not list(tmp_path.glob("out*"))  # nothing left behind


def test_bad_records_skipped_and_counted(tmp_path, spm_model):
    records = [{"messages": CONVS[0]}] + [r for r, _ in BAD] + [{"messages": CONVS[1]}]
    src = write_chat(tmp_path / "c.jsonl", records)
    report = preprocess_sft(
        SFTConfig(
            str(src), str(tmp_path / "out"), "SentencePieceTokenizer", spm_model, on_error="skip"
        )
    )
    assert report.num_conversations == 2
    assert report.skipped == {r: 1 for _, r in BAD}
    stats = json.loads((tmp_path / "out_sft_stats.json").read_text())
    assert stats["conversations"] == 2 and stats["skipped"] == report.skipped


def test_all_bad_is_an_error(tmp_path, spm_model):
    src = write_chat(tmp_path / "c.jsonl", [{"messages": []}])
    with pytest.raises(SFTError, match="no valid conversation"):
        preprocess_sft(
            SFTConfig(
                str(src), str(tmp_path / "o"), "SentencePieceTokenizer", spm_model, on_error="skip"
            )
        )


def sft_spec(report, **kw):
    comp = MixtureComponent(
        "chat", [report.text_prefix], 1.0, mask_prefixes=[report.mask_prefix], **kw
    )
    return MixtureSpec([comp], seed=3)


def test_loader_loss_mask_covers_only_assistant_labels(sft_data):
    root, report = sft_data
    S = 64
    index = build_mixture_index(sft_spec(report), S, 12, vocab_size=1000, cache_dir=root / "cache")
    loader = MixtureLoader(index, 4, 2, 0, 1)
    # an independent reference: the whole stream of tokens and masks, in the index's order
    comp = index.components[0]
    texts, masks = read_docs(report.text_prefix), read_docs(report.mask_prefix)
    stream_t = np.concatenate([texts[d] for d in comp.stream_doc])
    stream_m = np.concatenate([masks[d] for d in comp.stream_doc])
    starts = set(comp.stream_cum.tolist())  # stream offsets where a conversation begins
    checked = 0
    for mb in loader:
        for i, s in enumerate(mb["sample_index"].tolist()):
            base = int(index.sample_local[s]) * S
            assert mb["tokens"][i].tolist() == stream_t[base : base + S].tolist()
            want = stream_m[base + 1 : base + S + 1].astype(np.float32)
            for t in range(S):  # no loss where the label opens the next conversation
                if base + t + 1 in starts:
                    want[t] = 0.0
            assert torch.equal(mb["loss_mask"][i], torch.from_numpy(want))
            checked += 1
    assert checked == 12
    # the mask is not trivial: some labels trained on, many not
    assert 0 < float(mb["loss_mask"].mean()) < 1


def test_loader_without_masks_unchanged(sft_data):
    root, report = sft_data
    spec = MixtureSpec([MixtureComponent("chat", [report.text_prefix], 1.0)], seed=3)
    plain = next(MixtureLoader(build_mixture_index(spec, 64, 4), 4, 2, 0, 1))
    masked = next(MixtureLoader(build_mixture_index(sft_spec(report), 64, 4), 4, 2, 0, 1))
    assert torch.equal(plain["tokens"], masked["tokens"])
    assert torch.equal(plain["cu_seqlens"], masked["cu_seqlens"])
    assert bool((masked["loss_mask"] <= plain["loss_mask"]).all())
    assert float(plain["loss_mask"].sum()) > float(masked["loss_mask"].sum())


def test_mask_prefix_errors(sft_data, tmp_path):
    root, report = sft_data
    with pytest.raises(MixtureError, match="one loss-mask prefix per entry of prefixes"):
        MixtureComponent("c", [report.text_prefix], 1.0, mask_prefixes=["a", "b"])
    other = tmp_path / "other"
    src = write_chat(tmp_path / "c.jsonl", [{"messages": CONVS[0]}])
    small = preprocess_sft(
        SFTConfig(str(src), str(other), "SentencePieceTokenizer", str(report_model(root)))
    )
    spec = MixtureSpec(
        [MixtureComponent("c", [report.text_prefix], 1.0, mask_prefixes=[small.mask_prefix])]
    )
    with pytest.raises(DataSourceError, match="does not match tokens"):
        build_mixture_index(spec, 64, 4)
    spec = MixtureSpec(
        [
            MixtureComponent(
                "c", [report.text_prefix], 1.0, mask_prefixes=[str(tmp_path / "missing")]
            )
        ]
    )
    with pytest.raises(DataSourceError, match="missing"):
        build_mixture_index(spec, 64, 4)


def report_model(root: Path) -> str:
    return json.loads((root / "chat_sft_stats.json").read_text())["tokenizer_model"]
