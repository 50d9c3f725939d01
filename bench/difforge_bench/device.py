"""The device's peak memory bandwidth (and dense bf16 FLOP/s where known): the 100% of "% of peak".

CUDA: a spec-sheet table by device name, else 2 x memory clock x bus width from the device
properties. CPU: no trustworthy spec number exists for a shared, virtualised host, so the peak is a
measured large ``copy_`` (read + write), taken once per run and labelled as measured.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

# (lower-case substring of torch.cuda.get_device_name, HBM bytes/s, dense bf16 FLOP/s).
# First match wins, so specific names come before the generic ones they contain.
_CUDA_SPEC_SHEET = (
    ("h100 pcie", 2.0e12, 756e12),
    ("h100 nvl", 3.9e12, 835e12),
    ("h100", 3.35e12, 989e12),  # SXM5 80GB HBM3: "NVIDIA H100 80GB HBM3"
    ("gh200", 4.0e12, 989e12),
    ("h200", 4.8e12, 989e12),
    ("h800", 3.35e12, 989e12),
    ("h20", 4.0e12, 148e12),
    ("b200", 8.0e12, 2250e12),
    ("a100-sxm4-80gb", 2.039e12, 312e12),
    ("a100 80gb pcie", 1.935e12, 312e12),
    ("a100", 1.555e12, 312e12),  # 40GB variants
    ("l40s", 0.864e12, 362e12),
    ("l40", 0.864e12, 181e12),
    ("l4", 0.3e12, 121e12),
    ("rtx 4090", 1.008e12, 165e12),
    ("rtx 3090", 0.936e12, 71e12),
)

CPU_COPY_BYTES = 256 << 20  # well above any L3, so the copy streams from DRAM


@dataclass(frozen=True)
class Peak:
    bandwidth_Bps: float | None
    flops: float | None
    source: str

    def describe(self) -> str:
        bw = f"{self.bandwidth_Bps / 1e9:,.0f} GB/s" if self.bandwidth_Bps else "unknown bandwidth"
        fl = f", {self.flops / 1e12:,.0f} TFLOP/s bf16 dense" if self.flops else ""
        return f"{bw}{fl} ({self.source})"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return _cpu_model_name()


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def peak_for(device: str) -> Peak:
    return _cuda_peak() if device == "cuda" else measure_cpu_copy_bandwidth()


def _cuda_peak() -> Peak:
    name = torch.cuda.get_device_name().lower()
    for key, bandwidth, flops in _CUDA_SPEC_SHEET:
        if key in name:
            return Peak(bandwidth, flops, f"spec sheet for '{key}'")
    props = torch.cuda.get_device_properties()
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        # Double data rate: two transfers per memory clock.
        return Peak(2 * clock_khz * 1e3 * bus_bits / 8, None, "2 x memory clock x bus width")
    return Peak(None, None, f"unknown device '{name}'")


def measure_cpu_copy_bandwidth(repeats: int = 5) -> Peak:
    src = torch.ones(CPU_COPY_BYTES // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        samples.append(time.perf_counter() - start)
    bandwidth = 2 * CPU_COPY_BYTES / statistics.median(samples)  # read src + write dst
    return Peak(bandwidth, None, f"measured: {CPU_COPY_BYTES >> 20} MiB torch copy_, {torch.get_num_threads()} threads")
