"""What a benchmark ran on: CPU model, core count, package versions, device, load average,
and the CPU time a hypervisor took away while it ran (steal).

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


def cpu_counters() -> tuple[int, int] | None:
    """`(steal, total)` CPU time in jiffies since boot from /proc/stat (None where absent)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (fields[7], sum(fields)) if len(fields) == 8 else None


def steal_percent(before: tuple[int, int] | None) -> float | None:
    """Percent of CPU time stolen by the hypervisor since `before = cpu_counters()`.

    On a shared VM this is why two runs of the same code differ: a figure measured while
    other guests took a third of the CPU is slow for reasons outside the code.
    """
    after = cpu_counters()
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100 * (after[0] - before[0]) / (after[1] - before[1]), 1)


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
