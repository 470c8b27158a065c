"""What the bench reads from the machine: peak memory (CUDA allocator, or the process's peak RSS) and the
device's name."""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Any

import torch


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # give freed heap memory back, then restart the peak-RSS count at the current RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    status = _proc_status()
    if "VmHWM" in status:
        return round(status["VmHWM"] / 1024, 1)
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except ImportError:
        return None


def _proc_status() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    values[key] = int(rest.split()[0])  # kB
    except OSError:
        pass
    return values


def rss_source() -> str:
    if os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK):
        return "process peak RSS (VmHWM, reset before each generate())"
    return "process peak RSS (lifetime maximum)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU ({name})"



def machine_info(device: torch.device) -> dict[str, Any]:
    """The machine a run measured on: device (CPU model or GPU name), threads, library versions."""
    import transformers

    info: dict[str, Any] = {
        "device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "cpu": device_name(torch.device("cpu"))[len("CPU ("):-1], "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def run_facts(model: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What every bench result records about the model and the machine it ran on."""
    return {
        "model_type": model.config.model_type, "device": device_name(device), "dtype": str(dtype),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": machine_info(device),
        "memory_source": "cuda max_memory_allocated" if device.type == "cuda" else rss_source(),
    }
