"""What this CPU computes natively: the facts auto's choices (and their cache) depend on."""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

log = logging.getLogger(__name__)

# The flags that change which runtime and precision win; the bench names them in its header.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_fp16")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())  # the first processor's lines stand for all
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def relevant_flags() -> list[str]:
    flags = cpu_flags()
    return [flag for flag in RELEVANT_FLAGS if flag in flags]


def flags_digest() -> str:
    return hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]


def native_bf16() -> bool:
    """bf16 in hardware: AVX512_BF16 or AMX, which is what OpenVINO's OPTIMIZATION_CAPABILITIES reports as
    BF16 on x86. Read from the kernel's flags rather than by asking OpenVINO: creating an ov.Core in every
    server just to ask would load OpenVINO and its thread pool into servers that never run it. Without
    those units OpenVINO ignores a bf16 hint and compiles f32 (checked on a Zen 2 EPYC), so bf16 would
    only be fp32 measured twice."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def native_int8() -> bool:
    """int8 dot products in hardware: AMX or VNNI (AVX-512 or AVX), the units OpenVINO's int8 kernels use.
    Without them int8 runs slower than fp32 (measured on a Zen 2 EPYC, docs/performance.md)."""
    return bool({"amx_int8", "avx512_vnni", "avx_vnni"} & cpu_flags())
