"""What the executor ran on: CPU, cores, memory, numpy and its BLAS, torch and its device.

Also the process's memory high-water mark (``VmHWM``), resettable on Linux by
writing ``5`` to ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        return None
    return None


def _kib(value: str | None) -> int | None:
    return int(value.split()[0]) * 1024 if value else None


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (None off Linux)."""
    return _kib(_proc_field("/proc/meminfo", "MemAvailable"))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int | None:
    return _kib(_proc_field("/proc/self/status", "VmRSS"))


def peak_rss_bytes() -> int:
    """VmHWM (since the last reset), else the lifetime ``ru_maxrss``."""
    hwm = _kib(_proc_field("/proc/self/status", "VmHWM"))
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_THREADED_LIBS = ("openblas", "mkl_rt", "libmkl", "blis", "libgomp", "libiomp", "libomp")


def loaded_thread_pool_libraries() -> list[str]:
    """BLAS/OpenMP shared libraries mapped into this process (from /proc/self/maps).

    Each keeps its own worker threads; more than one (numpy's and scipy's
    OpenBLAS, or OpenBLAS and torch's OpenMP) can compete for the same cores.
    """
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    names = {Path(line.split()[-1]).name for line in lines if "/" in line}
    return sorted(n for n in names if any(lib in n.lower() for lib in _THREADED_LIBS))


def cpu_times() -> tuple[float, float] | None:
    """(all jiffies, steal jiffies) summed over CPUs from /proc/stat, or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    values = [float(v) for v in fields[1:]]
    return sum(values[:8]), values[7] if len(values) > 7 else 0.0  # guest time is inside user


def contention(before: tuple[float, float] | None, load_before: float) -> dict[str, float | None]:
    """Signs that something else used the CPU during a measurement: load average and steal."""
    after = cpu_times()
    steal = None
    if before is not None and after is not None and after[0] > before[0]:
        steal = (after[1] - before[1]) / (after[0] - before[0])
    return {"load_average_before": load_before, "load_average_after": os.getloadavg()[0],
            "steal_fraction": steal}


def _blas() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        deps = np.show_config(mode="dicts").get("Build Dependencies", {})  # numpy >= 1.25
        blas = deps.get("blas", {})
        info = {k: blas.get(k) for k in ("name", "version", "openblas configuration") if blas.get(k)}
    except (TypeError, AttributeError):
        pass
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = [
            {k: pool.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for pool in threadpool_info()
        ]
    except ImportError:
        pass
    info["thread_pool_libraries"] = loaded_thread_pool_libraries()
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
               if k in os.environ}
    if threads:
        info["thread_env"] = threads
    return info


def _torch(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"version": torch.__version__, "num_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda_version"] = torch.version.cuda
    return info


def machine_info(backend: str = "numpy", device: str = "cpu") -> dict[str, Any]:
    """A JSON-ready description of this machine and the numeric libraries in use."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_total_bytes": _kib(_proc_field("/proc/meminfo", "MemTotal")),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "blas": _blas(),
    }
    if backend == "torch":
        info["torch"] = _torch(device)
    return info
