"""GPU presets: peak dense bf16 FLOP/s, memory, and link bandwidths (per GPU, one direction).

Bandwidths are nominal per-GPU, one direction: NVLink's datasheet figure is the bidirectional
total, so it is halved; InfiniBand is one NIC per GPU (the DGX/HGX reference design).
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One GPU model and its links.

    Attributes:
        name: preset name.
        peak_bf16_flops: dense (non-sparse) bf16 tensor-core FLOP/s of one GPU.
        memory_bytes: HBM capacity of one GPU.
        nvlink_bytes_per_s: intra-node bandwidth per GPU, one direction.
        internode_bytes_per_s: inter-node (InfiniBand) bandwidth per GPU, one direction.
    """

    name: str
    peak_bf16_flops: float
    memory_bytes: float
    nvlink_bytes_per_s: float
    internode_bytes_per_s: float

    def with_memory_gb(self, gb: float) -> Hardware:
        """The same GPU with ``gb`` x 1e9 bytes of memory (e.g. H100 NVL 94 GB, A100 40 GB)."""
        return Hardware(
            self.name,
            self.peak_bf16_flops,
            gb * GB,
            self.nvlink_bytes_per_s,
            self.internode_bytes_per_s,
        )


HARDWARE: dict[str, Hardware] = {
    # NVIDIA H100 SXM5 datasheet: 989 TFLOPS bf16 dense (1,979 with sparsity), 80 GB HBM3,
    # NVLink 4 900 GB/s bidirectional; DGX H100: 8x ConnectX-7 400 Gb/s NDR (50 GB/s) per GPU.
    "h100": Hardware("h100", 989e12, 80 * GB, 450 * GB, 50 * GB),
    # NVIDIA A100 SXM4 80GB datasheet: 312 TFLOPS bf16 dense, 80 GB HBM2e, NVLink 3 600 GB/s
    # bidirectional; DGX A100: 8x ConnectX-6 200 Gb/s HDR (25 GB/s) per GPU.
    "a100": Hardware("a100", 312e12, 80 * GB, 300 * GB, 25 * GB),
    # NVIDIA H200 SXM datasheet: 989 TFLOPS bf16 dense (same die as H100), 141 GB HBM3e,
    # NVLink 4 900 GB/s bidirectional; DGX H200: 8x ConnectX-7 400 Gb/s per GPU.
    "h200": Hardware("h200", 989e12, 141 * GB, 450 * GB, 50 * GB),
}


def get_hardware(name: str, memory_gb: float | None = None) -> Hardware:
    """A preset by name, optionally with a different memory size.

    Raises:
        KeyError: unknown name (the message lists the presets).
    """
    if name not in HARDWARE:
        raise KeyError(f"unknown hardware {name!r}; choose one of {sorted(HARDWARE)}")
    hw = HARDWARE[name]
    return hw.with_memory_gb(memory_gb) if memory_gb is not None else hw
