"""The machine line: what every benchmark and ``binarize bench`` print beside their figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from binarize.runtime.kernel import kernel_info

__all__ = ["machine_line"]

_ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_vpopcntdq",
    "avx512_bitalg",
    "amx_int8",
    "asimd",
    "sve",
)


def _cpu() -> tuple[str, list[str]]:
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not name:
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "unknown CPU", [f for f in _ISA_FLAGS if f in flags]


def machine_line(threads: int | None = None) -> str:
    """One line naming the CPU, its relevant instruction sets, the CPU count, torch, the threads, the packed kernel
    (active and available) and onnxruntime when installed: what every benchmark prints beside its figures."""
    name, isa = _cpu()
    threads = threads if threads is not None else torch.get_num_threads()
    info = kernel_info()
    parts = [
        name,
        f"ISA {' '.join(isa) or 'none of ' + '/'.join(_ISA_FLAGS[:4])}",
        f"{os.cpu_count()} CPUs",
        f"torch {torch.__version__}",
        f"{threads} thread{'s' if threads != 1 else ''}",
        f"packed kernel {info['active']} (available: {', '.join(info['available'])})",
    ]
    try:
        import onnxruntime

        parts.append(f"onnxruntime {onnxruntime.__version__}")
    except ImportError:
        pass
    return "; ".join(parts)
