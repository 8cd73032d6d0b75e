"""The hardware check: does a profile fit the GPUs (or the host) of this worker?

Before a worker loads a profile it compares what the model needs (its weights at the
profile's dtype or quantization, plus the KV cache for one sequence of the maximum
length, plus a fixed allowance for the CUDA context and activations) with what NVML
reports free on the GPUs the worker may use, and the GPU count with the tensor-parallel
size. A profile that does not fit is refused with one sentence a person understands,
never left to fail with an out-of-memory error halfway through loading.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from catalog.profiles import Profile

GIB = 1 << 30
# CUDA context, activations and vLLM's own buffers, per GPU (measured: 0.6-1.2 GiB).
GPU_OVERHEAD_BYTES = 1 * GIB
CPU_OVERHEAD_BYTES = GIB // 2
_DTYPE_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0}
# 4-bit weights plus their scales and the layers left unquantized (embeddings, head).
_QUANT_BYTES = {"awq": 0.55, "awq_marlin": 0.55, "gptq": 0.55, "gptq_marlin": 0.55, "bitsandbytes": 0.55}


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Need:
    weights_bytes: int
    kv_bytes: int
    per_gpu_bytes: int  # on each of tensor_parallel_size GPUs (or the host, on CPU)


def _dtype_bytes(profile: Profile, *, on_gpu: bool) -> float:
    dtype = profile.engine.dtype
    if dtype == "auto":  # chatq runs "auto" as float32 on CPU; on a GPU vLLM picks 16 bits
        return 2.0 if on_gpu else 4.0
    return _DTYPE_BYTES[dtype]


def memory_need(profile: Profile, *, on_gpu: bool) -> Need:
    """What the profile needs: weights by dtype or quantization, KV cache for max_model_len."""
    mem = profile.memory
    quant = profile.engine.quantization
    if mem.weights_gib is not None:
        weights = mem.weights_gib * GIB
    elif quant == "fp8":
        weights = mem.params_b * 1e9
    elif quant is not None:
        weights = mem.params_b * 1e9 * _QUANT_BYTES[quant]
    else:
        weights = mem.params_b * 1e9 * _dtype_bytes(profile, on_gpu=on_gpu)
    kv_elem = _dtype_bytes(profile, on_gpu=on_gpu) if quant is None else 2.0
    kv = 2 * mem.layers * mem.kv_heads * mem.head_dim * profile.engine.max_model_len * kv_elem
    tp = profile.engine.tensor_parallel_size if on_gpu else 1
    overhead = GPU_OVERHEAD_BYTES if on_gpu else CPU_OVERHEAD_BYTES
    return Need(int(weights), int(kv), int((weights + kv) / tp + overhead))


def gib(n: float) -> str:
    """Bytes as GiB for a sentence: '24 GiB', '13.8 GiB'."""
    value = n / GIB
    return f"{value:.0f} GiB" if abs(value - round(value)) < 0.05 else f"{value:.1f} GiB"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def check(
    profile: Profile, gpus: Sequence[GpuInfo], *, host_available: int | None = None, loaded: bool = False
) -> str | None:
    """Why the profile cannot load here, as one sentence; None when it fits.

    `loaded`: this worker still holds a model, so compare with the GPUs' total memory (what
    will be free once it is unloaded) rather than what is free now.
    """
    tp = profile.engine.tensor_parallel_size
    if not gpus:
        need = memory_need(profile, on_gpu=False)
        if not profile.cpu:
            gpu_need = memory_need(profile, on_gpu=True).per_gpu_bytes
            return (
                f"{profile.id} needs {_plural(tp, 'GPU')} with {gib(gpu_need)} free each; "
                "this worker has no GPU (without one only profiles marked cpu = true load)"
            )
        if host_available is not None and not loaded and host_available < need.per_gpu_bytes:
            return (
                f"{profile.id} needs {gib(need.per_gpu_bytes)} of memory; "
                f"this host has {gib(host_available)} available"
            )
        return None
    need_each = memory_need(profile, on_gpu=True).per_gpu_bytes
    free = sorted((g.total_bytes if loaded else g.free_bytes for g in gpus), reverse=True)
    have = "total" if loaded else "free"
    usable = [f for f in free if f >= need_each]
    if len(usable) < tp:
        if len(gpus) < tp or not usable:
            has = f"this worker has {len(gpus)} with {gib(free[0])} {have}" + (
                "" if len(gpus) == 1 else " on the largest"
            )
        else:
            has = f"this worker has {len(usable)} of its {len(gpus)} with that much {have}"
        return f"{profile.id} needs {_plural(tp, 'GPU')} with {gib(need_each)} free each; {has}"
    # vLLM takes gpu_memory_utilization of each GPU's total and refuses to start when less
    # is free: the model must fit in that share, and that share must be free.
    share = profile.engine.gpu_memory_utilization
    chosen = sorted(gpus, key=lambda g: g.total_bytes if loaded else g.free_bytes, reverse=True)[:tp]
    for gpu in chosen:
        budget = share * gpu.total_bytes
        if budget < need_each:
            return (
                f"{profile.id} needs {gib(need_each)} on each GPU but gpu_memory_utilization "
                f"{share:g} gives vLLM only {gib(budget)} of GPU {gpu.index} ({gib(gpu.total_bytes)})"
            )
        if not loaded and gpu.free_bytes < budget:
            return (
                f"{profile.id} runs vLLM with gpu_memory_utilization {share:g}, {gib(budget)} of GPU "
                f"{gpu.index}, but only {gib(gpu.free_bytes)} is free there"
            )
    return None


def _visible(indices: list[int]) -> list[int]:
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return indices
    try:
        wanted = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:  # UUIDs: leave the choice to CUDA, count every GPU
        return indices
    return [i for i in wanted if i in indices]


def read_gpus() -> list[GpuInfo]:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES), as NVML reports them; [] without."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library: no GPU
        return []
    try:
        found: list[GpuInfo] = []
        for index in _visible(list(range(pynvml.nvmlDeviceGetCount()))):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found.append(
                GpuInfo(index, str(pynvml.nvmlDeviceGetName(handle)), int(info.total), int(info.free))
            )
        return found
    except Exception:  # noqa: BLE001 - a GPU that does not answer is not one to load on
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - nothing to do about it
            pass


def host_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable of this host, or None where /proc/meminfo is missing."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
