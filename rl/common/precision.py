"""Compute precision chosen by the hardware: the one place that decides bf16 or float32.

bfloat16 pays only where the device computes it natively. On a CPU without AVX512_BF16/AMX, torch and
oneDNN emulate it and a bf16 matmul is ~50x slower than float32 (measured on an AMD EPYC with AVX2:
512x512, one thread, 0.0045 s vs 0.24 s). So every precision setting of the project accepts ``auto``,
its default:

    sft.bf16, rl.bf16        auto | true | false                  (bf16 autocast; weights stay float32)
    rollout.dtype            auto | float32 | bfloat16 | float16   (the engine's weights and compute)

``auto`` is bf16 where ``detect_hardware`` says the device computes it natively (a CUDA device with bf16
support; a CPU with AVX512_BF16 or AMX that torch and oneDNN are allowed to use), float32 elsewhere.
The CPU check honours the ISA overrides ``ATEN_CPU_CAPABILITY`` (torch's reported capability) and
``ONEDNN_MAX_CPU_ISA`` (oneDNN's own bf16 check), so ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``
makes a bf16 machine behave, and resolve, like an AVX2-only one.

An explicit bf16 on a CPU without native bf16 is honoured, after a warning that names the capability
and the slowdown a short matmul probe measures (``slow_bf16_warning``).

The other half of precision is the weights' own: training bf16/fp16 parameters directly (no float32
master copy) rounds most small updates away (``vanishing_update_share``, ``low_precision_warning``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import torch

__all__ = ["Hardware", "Precision", "detect_hardware", "resolve_bf16", "resolve_dtype", "bf16_slowdown",
           "slow_bf16_warning", "stage_device", "vanishing_update_share", "low_precision_warning"]

BF16Setting = Literal["auto"] | bool
DTypeSetting = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class Hardware:
    """What a device offers for bf16, and why: the input of every ``auto`` decision."""

    device: str  # "cpu" | "cuda"
    capability: str  # CPU: what torch reports (AVX512, AVX2, ...); CUDA: sm_XY
    units: str  # CPU: the bf16 units present (AVX512_BF16+AMX, or ""); CUDA: the device name
    native_bf16: bool
    reason: str  # one line: why native_bf16 is what it is

    def describe(self) -> str:
        return f"{self.device} {self.capability}" + (f" [{self.units}]" if self.units else "")

    @property
    def tag(self) -> str:
        """Short name of the kind of machine, for results files: cpu-avx512-bf16, cpu-avx2, cuda-sm_90, ..."""
        return f"{self.device}-{self.capability.lower()}" + ("-bf16" if self.device == "cpu" and self.native_bf16 else "")

    def as_dict(self) -> dict:
        return {**asdict(self), "tag": self.tag}


@dataclass(frozen=True)
class Precision:
    """A resolved setting: the dtype the trainer computes in (bf16 autocast or not) or the engine runs in."""

    setting: str  # as written in the recipe: "auto", "true", "false", "float32", ...
    dtype: str  # "bfloat16" | "float32" | "float16"
    hardware: Hardware

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    def describe(self) -> str:
        how = "auto" if self.setting == "auto" else f"set to {self.setting}"
        return f"{self.dtype} ({how}; {self.hardware.describe()}: {self.hardware.reason})"

    def as_dict(self) -> dict:
        return {"setting": self.setting, "dtype": self.dtype, **self.hardware.as_dict()}


def stage_device() -> str:
    """The device a stage's trainer or engine runs on here: ``cuda`` when one is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def detect_hardware(device: str | None = None) -> Hardware:
    """Whether ``device`` (default: ``stage_device()``) computes bf16 natively. The one decision function."""
    device = device or stage_device()
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        major, minor = torch.cuda.get_device_capability(index)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        why = "bf16 tensor cores (sm_80 or newer)" if native else "no native bf16 before sm_80"
        return Hardware("cuda", f"sm_{major}{minor}", torch.cuda.get_device_name(index), native, why)
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    units = "+".join(u for u, has in (("AVX512_BF16", torch.cpu._is_avx512_bf16_supported()),
                                      ("AMX", torch.cpu._is_amx_tile_supported())) if has)
    if not units:
        return Hardware("cpu", capability, units, False, "no AVX512_BF16/AMX: bf16 is emulated")
    if not capability.startswith("AVX512"):
        return Hardware("cpu", capability, units, False, f"torch restricted to {capability} (ATEN_CPU_CAPABILITY)")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():  # honours ONEDNN_MAX_CPU_ISA
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "?"
        return Hardware("cpu", capability, units, False, f"oneDNN has no bf16 path (ONEDNN_MAX_CPU_ISA={isa})")
    return Hardware("cpu", capability, units, True, "native bf16 in torch and oneDNN")


def _setting_text(setting) -> str:
    return str(setting).lower() if isinstance(setting, bool) else str(setting)


def resolve_bf16(setting: BF16Setting, device: str | None = None, hardware: Hardware | None = None) -> Precision:
    """A trainer's ``bf16: auto | true | false`` -> bfloat16 (autocast) or float32."""
    if setting not in ("auto", True, False):
        raise ValueError(f"bf16 must be auto, true or false, got {setting!r}")
    hardware = hardware or detect_hardware(device)
    bf16 = hardware.native_bf16 if setting == "auto" else bool(setting)
    return Precision(_setting_text(setting), "bfloat16" if bf16 else "float32", hardware)


def resolve_dtype(setting: DTypeSetting, device: str | None = None, hardware: Hardware | None = None) -> Precision:
    """An engine's ``dtype: auto | float32 | bfloat16 | float16`` -> the dtype it loads and computes in."""
    if setting not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {setting!r}")
    hardware = hardware or detect_hardware(device)
    dtype = ("bfloat16" if hardware.native_bf16 else "float32") if setting == "auto" else setting
    return Precision(setting, dtype, hardware)


def bf16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """Time of a bf16 matmul over a float32 one of the same size, on this CPU (best of ``repeats``; < 0.5 s)."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # first call: oneDNN primitive creation
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - t)
        best[dtype] = min(times)
    return best[torch.bfloat16] / max(best[torch.float32], 1e-9)


def slow_bf16_warning(precision: Precision, what: str) -> str | None:
    """A warning for bf16 asked for explicitly on a CPU that does not compute it natively; None otherwise."""
    hw = precision.hardware
    if precision.setting == "auto" or precision.dtype != "bfloat16" or hw.device != "cpu" or hw.native_bf16:
        return None
    factor = bf16_slowdown()
    return (f"{what} is bf16 on a CPU without native bf16 ({hw.describe()}: {hw.reason}); a bf16 matmul measured "
            f"{factor:.0f}x slower than float32 here. Set it to auto (float32 on this CPU) unless you mean to.")


# --------------------------------------------------------------------------- the weights' own precision

LOW_PRECISION = (torch.bfloat16, torch.float16)


@torch.no_grad()
def vanishing_update_share(params: Iterable[torch.Tensor], step: float, chunk: int = 1 << 22) -> float:
    """Share of the elements of low-precision ``params`` where ``w + step`` rounds back to ``w``.

    The definition itself, evaluated element by element (in float32, then rounded to the parameter's
    dtype, as a low-precision optimizer step does); float32/float64 parameters count as kept.
    Returns 0.0 when there are no elements.
    """
    lost = total = 0
    for p in params:
        flat = p.detach().reshape(-1)
        total += flat.numel()
        if flat.dtype not in LOW_PRECISION:
            continue
        for start in range(0, flat.numel(), chunk):
            w = flat[start:start + chunk]
            lost += int(((w.float() + step).to(w.dtype) == w).sum())
    return lost / total if total else 0.0


def low_precision_warning(model: torch.nn.Module, lr: float) -> str | None:
    """A warning when trainable parameters are bf16/fp16 and an update of size ``lr`` would mostly vanish."""
    params = [p for p in model.parameters() if p.requires_grad]
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype in LOW_PRECISION})
    if not dtypes:
        return None
    share = vanishing_update_share(params, lr)
    return (f"training {'/'.join(dtypes)} parameters directly (no float32 master copy): an update of size "
            f"lr={lr:g} rounds back to the old value for {share:.0%} of the trainable weights. Load the model "
            f"in float32 (model.dtype: float32) and leave bf16 compute to sft.bf16 (auto or true), or shard "
            f"float32 weights across GPUs (FSDP).")
