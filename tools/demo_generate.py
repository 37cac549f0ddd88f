"""Greedy generation from an exported HF Llama directory with transformers (offline).

python tools/demo_generate.py --hf-dir demo_out/hf --tokenizer-model demo_out/tokenizer/spm.model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--tokenizer-model", required=True, help="sentencepiece .model")
    p.add_argument("--prompt", default="def main(")
    p.add_argument("--max-new-tokens", type=int, default=40)
    args = p.parse_args(argv)

    import torch
    from transformers import LlamaForCausalLM

    from megatron_longctx.data.preprocess.tokenizer import load_tokenizer

    cfg = json.loads((Path(args.hf_dir) / "config.json").read_text())
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    model = LlamaForCausalLM.from_pretrained(args.hf_dir, local_files_only=True).eval()
    tok = load_tokenizer("SentencePieceTokenizer", args.tokenizer_model)
    ids = torch.tensor([tok.encode(args.prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(
        f"HF model: {args.hf_dir} (rope_theta {theta}, max_position_embeddings "
        f"{cfg.get('max_position_embeddings')})"
    )
    print(f"prompt: {args.prompt!r}\ngeneration: {tok.decode(out[0].tolist())!r}")


if __name__ == "__main__":
    main()
