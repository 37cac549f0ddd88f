"""Process-level runtime: device choice, the CPU shim for megatron-core, torch.distributed init."""
