"""The CPU kernels a process computes with, and the settings under which training gives the same
bits on any x86-64 CPU with AVX2.

Float rounding depends on the kernels torch dispatches to: ATen's vectorised loops (chosen by the
CPU's widest SIMD), MKL's matrix products and oneDNN's convolutions (each with its own dispatch).
Training carries that rounding through every step, so one recipe built natively on an AVX512 CPU
and on an AVX2 one gives two different models. Pinned to AVX2, all three run the same code on any
CPU that has it: the default organism rebuilt under `PORTABLE_KERNELS` on an AVX512 AMD EPYC
matches the shipped weights byte for byte, which native kernels there do not, nor ATen pinned alone.

The libraries read these settings when they load, so they must be in the environment before
`import torch`: flipscope's training commands and its test suite set them (`prefer_portable`), and
every build records what it ran (`build_kernels`). Inference needs no pinning: across kernels its
floats differ by about 1e-5, which the suite's tolerances absorb.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

__all__ = ["PORTABLE_KERNELS", "NativeKernelsWarning", "build_kernels", "kernel_settings", "prefer_portable"]

PORTABLE_KERNELS: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


class NativeKernelsWarning(UserWarning):
    """A model was trained on this CPU's own kernels: its bits are this CPU's, not the recipe's."""


def prefer_portable() -> bool:
    """Put each of `PORTABLE_KERNELS` into the environment where it is not set already (a setting
    the user chose is kept), if torch has not loaded yet. True if this process will run them all."""
    if "torch" not in sys.modules:
        for name, value in PORTABLE_KERNELS.items():
            os.environ.setdefault(name, value)
    return all(_pinned(name) for name in PORTABLE_KERNELS)


def kernel_settings() -> dict[str, Any]:
    """What this process computes with: ATen's CPU capability, MKL's and oneDNN's pinned ISA (None
    where unpinned), and whether that is the portable set (ATen's capability is what torch chose,
    so a CPU without AVX2 reports less than was asked for and is not portable)."""
    import torch

    libraries = [name for name in PORTABLE_KERNELS if name != "ATEN_CPU_CAPABILITY"]
    settings: dict[str, Any] = {"aten": torch.backends.cpu.get_cpu_capability()}
    settings |= {name: os.environ.get(name) for name in libraries}
    settings["portable"] = settings["aten"] == "AVX2" and all(_pinned(name) for name in libraries)
    return settings


def _pinned(name: str) -> bool:
    """Whether the environment sets `name` to its portable value."""
    return os.environ.get(name, "").lower() == PORTABLE_KERNELS[name].lower()


def build_kernels(what: str, device: Any = "cpu") -> dict[str, Any]:
    """`kernel_settings()` for the record of a training run (`what` names it), with a
    `NativeKernelsWarning` where they are not the portable set. A run on an accelerator records its
    device instead: no setting makes its bits another device's."""
    if str(device).split(":")[0] != "cpu":
        return {"device": str(device), "portable": False}
    settings = kernel_settings()
    if not settings["portable"]:
        pinned = " ".join(f"{name}={value}" for name, value in PORTABLE_KERNELS.items())
        native = ", ".join(f"{name} {value}" for name, value in settings.items() if name != "portable")
        warnings.warn(
            f"{what} trained on this CPU's own kernels ({native}): its bits are this CPU's. For a build that is "
            f"the same on any x86-64 CPU with AVX2, set {pinned} before torch loads (flipscope's training "
            "commands do).",
            NativeKernelsWarning,
            stacklevel=2,
        )
    return settings
