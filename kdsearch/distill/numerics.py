"""How frozen teachers compute: one rule for every teacher source (in-process, Ray actor, cache builder).

Teachers only run inference, so reduced precision costs them nothing that matters for distillation (the KD
targets are softened by T >= 1 and stored as float16 in the cache anyway) and buys a lot: on a GPU, bf16
autocast; on a CPU with native bf16 (AVX512-BF16 / AMX), the same autocast runs the evidence teachers
(resnet20 + wrn_16_2) several times faster than fp32 (benchmarks/cpu_teacher_inference.py, results in
benchmarks/results/cpu_teacher_inference.json).
CPUs without native bf16 would emulate it, slower than fp32, so they stay in fp32. channels_last helps the
convolutions on both devices. The numerics are part of what the teachers' logits depend on, so the logit
cache's key includes `teacher_numerics` (a cache built in fp32 is not replayed as if it were bf16).
"""

from __future__ import annotations

import contextlib

import torch


def native_cpu_bf16() -> bool:
    """True when this CPU runs bf16 matrix products natively (AVX512-BF16 or AMX)."""
    cpu = torch.cpu
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    return False


def teacher_bf16(device: torch.device, requested: bool = True) -> bool:
    """Whether teachers on `device` run under bf16 autocast."""
    if not requested:
        return False
    return device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16())


def teacher_format(channels_last: bool = True) -> torch.memory_format:
    """channels_last (faster convolutions on GPUs and on oneDNN CPUs) unless the caller turns it off."""
    return torch.channels_last if channels_last else torch.contiguous_format


def teacher_autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[object]:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def teacher_numerics(device: torch.device, requested: bool = True) -> str:
    """The name of the numerics teachers on `device` use ("bf16" or "fp32"): part of the logit cache's key."""
    return "bf16" if teacher_bf16(device, requested) else "fp32"
