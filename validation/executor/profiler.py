"""Kernel timer: time spent inside the math, per op name, versus the step's wall time.

Every numeric call of the model goes through ``KernelProfiler.__call__`` with the
name of the simulator op it stands for (``qkv_proj``, ``attention``, ...). Then

    dispatch_s = step_wall_s - sum(kernel_s)

is the time outside the math: Python control flow, views and reshapes, freeing
the step's temporaries (large numpy buffers are unmapped when their last
reference goes), and the timer itself (two ``perf_counter`` calls, ~0.1 us, per
kernel). On an
asynchronous device ``sync`` (e.g. ``torch.cuda.synchronize``) runs inside each
timed region so the kernel's own time is counted, which also removes the
overlap of launch and execution that an untimed run would have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class OpTotal:
    count: int = 0
    time_s: float = 0.0


@dataclass
class KernelProfiler:
    """Accumulates kernel count and time per op name until ``reset``."""

    sync: Callable[[], None] | None = None
    ops: dict[str, OpTotal] = field(default_factory=dict)
    kernel_s: float = 0.0
    kernels: int = 0

    def __call__(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        start = perf_counter()
        out = fn(*args)
        if self.sync is not None:
            self.sync()
        elapsed = perf_counter() - start
        self.kernel_s += elapsed
        self.kernels += 1
        total = self.ops.get(name)
        if total is None:
            total = self.ops[name] = OpTotal()
        total.count += 1
        total.time_s += elapsed
        return out

    def reset(self) -> None:
        self.ops = {}
        self.kernel_s = 0.0
        self.kernels = 0
