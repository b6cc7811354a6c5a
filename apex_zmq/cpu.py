"""What this CPU can do fast: the facts the acting copy's number format and the benchmarks depend on.

Read once from ``/proc/cpuinfo`` (Linux) with torch's own view as the fallback. Code that chooses by
capability takes a ``CpuCaps`` argument, so tests fake each kind of CPU instead of needing one.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuCaps:
    """The capabilities that matter here."""

    model: str
    cores: int
    x86: bool
    avx2: bool
    avx512: bool
    vnni: bool  # AVX512-VNNI or AVX-VNNI: u8 x s8 dot products accumulate in 32 bits, no saturation
    bf16: bool  # native bfloat16 convolutions and matmuls (AVX512-BF16 or AMX)
    amx: bool

    def describe(self) -> str:
        """One line for logs and benchmark headers: model, vector extensions, cores."""
        ext = [name for name, on in (("AVX2", self.avx2), ("AVX-512", self.avx512), ("VNNI", self.vnni),
                                     ("BF16", self.bf16), ("AMX", self.amx)) if on]
        return f"{self.model} [{' '.join(ext) or 'no AVX2'}] {self.cores} cores"


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model or platform.machine(), flags


@functools.lru_cache(maxsize=1)
def detect() -> CpuCaps:
    """This machine's capabilities."""
    import torch

    model, flags = _cpuinfo()
    torch_level = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return CpuCaps(
        model=model, cores=os.cpu_count() or 1, x86=x86,
        avx2="avx2" in flags or torch_level in ("AVX2", "AVX512"),
        avx512="avx512f" in flags or torch_level == "AVX512",
        # Unknown (no flags to read) counts as absent: the safe int8 range is then used.
        vnni=bool({"avx512_vnni", "avx_vnni"} & flags),
        bf16=bf16 or bool({"avx512_bf16", "amx_bf16"} & flags),
        amx="amx_tile" in flags)
