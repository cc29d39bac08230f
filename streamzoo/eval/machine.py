"""What a benchmark ran on: CPU model, core count, package versions, device, load average.

Every figure in benchmarks/RESULTS.md is stored with this description, so numbers from a
shared or different machine are never compared unknowingly.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version

import jax


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded (how busy the machine was)."""
    return [round(v, 2) for v in os.getloadavg()]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def machine_info(*packages: str) -> dict:
    """CPU, cores, Python, jax/jaxlib/flax and `packages` versions, the default device (with its
    memory where the backend reports it) and `uptime`'s line."""
    dev = jax.devices()[0]
    info = {"cpu": cpu_model(), "nproc": os.cpu_count(), "python": platform.python_version(),
            "backend": jax.default_backend(), "device": str(dev), "device_kind": dev.device_kind,
            "device_count": jax.device_count()}
    for name in ("jax", "jaxlib", "flax", *packages):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    try:
        stats = dev.memory_stats() or {}
        if "bytes_limit" in stats:
            info["device_memory_gib"] = round(stats["bytes_limit"] / 2 ** 30, 1)
    except Exception:  # noqa: BLE001 - not every backend reports memory
        pass
    try:
        info["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True,
                                        timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info
