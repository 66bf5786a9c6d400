"""What a run ran on, for metrics.json: the device's name and peak memory."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path

import torch

__all__ = ["peak_memory_mb", "hardware_description", "cpu_model"]


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"


def cpu_model() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else its architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} CPU"
