"""Data path: raw text -> tokens (preprocess/), long-document builders, mixture, packing.

Submodules are imported on demand so that ``import megatron_longctx.data`` stays cheap (no torch).
"""
