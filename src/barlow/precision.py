"""Which floating-point precision a run computes in, and the autocast dtype of each:
what pretraining and the evaluations share, apart from the training loop (so that a
change to barlow.train does not rerun every evaluation)."""

from __future__ import annotations

from pathlib import Path

import torch

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 in hardware: the x86 flags avx512_bf16 or
    amx_bf16 in /proc/cpuinfo (Zen 4+, Cooper Lake, Sapphire Rapids+). Elsewhere bf16
    is emulated and slower than fp32, so "auto" keeps fp32 (also where /proc is absent)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_precision(capability: tuple[int, int]) -> str:
    """"auto" on a GPU of compute capability ``capability``: bf16 where its tensor cores
    have it (Ampere, 8.0, and later), else fp16 with the grad scaler. Not
    ``torch.cuda.is_bf16_supported()``, which also answers True for the emulated bf16
    of a V100 or T4 (slower than fp16 there)."""
    return "bf16" if capability >= (8, 0) else "fp16"


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: "fp32", "bf16" and "fp16" as given; "auto" is
    ``cuda_precision`` on a GPU, bf16 on a CPU with native bf16 (measured 1.38x the fp32
    step here, benchmarks/README.md), fp32 on other CPUs.
    The loss is fp32 in every case (barlow.loss)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return cuda_precision(torch.cuda.get_device_capability(device))
    return "bf16" if cpu_has_native_bf16() else "fp32"
