"""Package definition for megatron-longctx.

Why each dependency is here:
- torch==2.13.0: the CPU wheel that exists on the project's machines; an unpinned torch pulls a multi-GB CUDA build.
- megatron-core==0.16.1: model, parallel state, schedules, DDP, optimizer, dist_checkpointing
  (0.16.1 is the newest release for Python 3.11).
- psutil: undeclared runtime dependency of megatron.core.dist_checkpointing (a save hangs without it).
- numpy: indexed datasets, packing index, statistics.
- sentencepiece / tokenizers: real tokenizers for preprocessing (no hub downloads).
- wandb: experiment logging (offline mode when no key is configured).
- pyyaml: recipe files.
- safetensors / transformers: Hugging Face checkpoint conversion and verification against transformers' Llama.
- jinja2: transformers' apply_chat_template renders a tokenizer's own chat template for SFT
  (transformers does not declare it).
- tqdm: progress bars for the CLI tools.
- matplotlib: PNG plots (length histograms, loss curves, evaluation heatmaps).
- gpu extra (GPU machines only; untested on GPU): transformer-engine[pytorch]>=2.2,<3 (2.2 added
  DotProductAttention's pad_between_seqs, model/attention/gpu.py; 3.x is not the API megatron-core
  0.16.1 targets) and flash-attn>=2.6,<2.9 (the varlen interfaces model/attention/flash_attn_api.py
  calls, read from the 2.6.0-2.8.3 tags; 2.5 returned the log-sum-exp in another layout). Both
  compile against the installed torch (no wheels for torch 2.13): install torch first, then
  `pip install --no-build-isolation '.[gpu]'` (README "GPU install"); `pip install '.[gpu]'` alone
  builds them in an isolated environment without torch and fails.
"""

from setuptools import find_packages, setup

setup(
    name="megatron-longctx",
    version="0.1.0",
    description="Long-context continued pretraining of Llama-style models on Megatron-Core",
    packages=find_packages(include=["megatron_longctx", "megatron_longctx.*"]),
    # The user-facing CLIs, installed on PATH so a non-editable install has them too (the library
    # never runs them by path; tests/integration/test_packaging.py checks a wheel install).
    scripts=[
        f"tools/{name}.py"
        for name in (
            "build_long_documents",
            "convert_checkpoint",
            "eval_longctx",
            "inspect_mixture",
            "make_sample_corpus",
            "plan",
            "preprocess_data",
            "preprocess_sft",
            "train_tokenizer",
        )
    ],
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "psutil",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "wandb",
        "pyyaml",
        "safetensors",
        "transformers>=4.45",
        "jinja2>=3.1",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # pytest-timeout: hard per-test timeout on multi-process tests (they hang rather than fail).
        "test": ["pytest", "pytest-timeout", "hypothesis"],
        # GPU kernels; never installed on the CPU machines (both compile against torch + CUDA:
        # pip install --no-build-isolation, see the docstring). Untested on GPU.
        "gpu": ["transformer-engine[pytorch]>=2.2,<3", "flash-attn>=2.6,<2.9"],
    },
)
