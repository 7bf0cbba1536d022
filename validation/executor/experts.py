"""MoE experts on disk behind a static in-memory cache, as ``OffloadPlan.expert_cache`` models it.

Each MoE layer keeps ``round(F * E)`` of its ``E`` routed experts in memory (the count
``simulator.strategies.offload._expert_terms`` uses) and the others in files, one per expert
(its arrays back to back). A step that routes tokens to an expert outside the cache reads
that expert's file into one reused buffer, with the page cache told to drop the file first
(``simulator.calibrate.host.read_file_into``, as ``offload.DiskLayers`` reads layers), and
then computes it; the read is timed as the op ``expert_load``. Every routed expert of a step
is a hit or a miss: ``expert_hits + expert_misses`` is the number of (layer, expert) pairs the
router chose, and ``expert_bytes_read`` what the misses read.

The cache is static and holds each layer's most popular experts, the simulator's
frequency-ordered cache at steady state (``expert_misses``), not an LRU. Popularity is profiled:
until ``choose_popular`` the cache holds the lowest-numbered experts; the harness first runs an
untimed prefill of another prompt (drawn from ``seed + 3``, the same shape), then calls
``choose_popular``, which makes each layer's cache the experts that profile routed the most
tokens to. A profile of the timed prompt itself would be an oracle: it would know which experts
the measured tokens pick.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from simulator.errors import InferSimError
from validation.executor.model import _convert
from validation.executor.offload import CHUNK, tree_views, write_tree
from validation.executor.weights import LayerWeights, MLPWeights

COUNTERS = ("expert_hits", "expert_misses", "expert_bytes_read")


class ExpertStore:
    """Every MoE layer's routed experts: ``cached`` of them resident, all of them in files."""

    def __init__(self, layers: list[LayerWeights], fraction: float, folder: Path | None = None):
        moe_layers = [i for i, layer in enumerate(layers) if layer.moe is not None]
        if not moe_layers:
            raise InferSimError("--expert-cache needs a mixture-of-experts model; this one is dense")
        if not 0.0 <= fraction <= 1.0:
            raise InferSimError(f"--expert-cache must be a fraction between 0 and 1, got {fraction:g}")
        self.fraction = fraction
        self.lists: dict[int, list[MLPWeights]] = {}  # the runtime's expert list of each layer
        first = layers[moe_layers[0]].moe
        assert first is not None
        self.num_experts = len(first.experts)
        self.cached = int(round(fraction * self.num_experts))
        self.folder = Path(tempfile.mkdtemp(prefix="infersim-experts-", dir=folder))
        self.files: dict[tuple[int, int], Path] = {}
        self.layouts: dict[tuple[int, int], list[tuple[tuple[int, ...], np.dtype, int]]] = {}
        self.templates: dict[tuple[int, int], MLPWeights] = {}
        self.sizes: dict[tuple[int, int], int] = {}
        self.resident: dict[int, dict[int, MLPWeights]] = {}
        self.counts: dict[int, np.ndarray] = {}
        self.expert_bytes = 0
        for index in moe_layers:
            moe = layers[index].moe
            assert moe is not None
            for number, expert in enumerate(moe.experts):
                self.expert_bytes = max(self.expert_bytes, self._write(index, number, expert))
            self.lists[index] = moe.experts
            self.resident[index] = {e: moe.experts[e] for e in range(self.cached)}
            self.counts[index] = np.zeros(self.num_experts, np.int64)
            self._install(index)
        self.buffer = np.empty(self.expert_bytes if self.cached < self.num_experts else 0, np.uint8)
        self.profiler: Any = None
        self.counters: dict[str, float] = {}

    @property
    def buffer_bytes(self) -> int:
        return int(self.buffer.nbytes)

    @property
    def disk_bytes(self) -> int:
        """Bytes of the experts outside the cache (held only in files)."""
        return sum(size for (index, number), size in self.sizes.items() if number not in self.resident[index])

    def _write(self, index: int, number: int, expert: MLPWeights) -> int:
        path = self.folder / f"layer-{index}-expert-{number}.bin"
        layout, offset = write_tree(path, expert)
        self.files[index, number] = path
        self.sizes[index, number] = offset
        self.layouts[index, number] = layout
        self.templates[index, number] = _convert(expert, lambda array: np.empty(0, array.dtype))
        return offset

    def _install(self, index: int) -> None:
        """The runtime's expert list: resident experts, and empty templates for the others."""
        experts = self.lists[index]
        for number in range(self.num_experts):
            experts[number] = self.resident[index].get(number, self.templates[index, number])

    def _views(self, index: int, number: int, buffer: np.ndarray) -> MLPWeights:
        return tree_views(self.templates[index, number], self.layouts[index, number], buffer)

    def _load(self, index: int, number: int) -> MLPWeights:
        """An expert joining the cache, in arrays of its own (untimed: the cache is set up once)."""
        return self._views(index, number, np.fromfile(self.files[index, number], np.uint8))

    def _read(self, index: int, number: int) -> MLPWeights:
        from simulator.calibrate.host import read_file_into  # the read calibration times

        done = read_file_into(self.files[index, number], self.buffer[:self.sizes[index, number]], CHUNK)
        self.counters["expert_bytes_read"] += done
        return self._views(index, number, self.buffer)

    def expert(self, index: int, number: int, tokens: int) -> MLPWeights:
        """Expert ``number`` of layer ``index``, routed ``tokens`` tokens: from the cache, or read."""
        self.counts[index][number] += tokens
        for name in COUNTERS:  # a step reports all three, zeros included
            self.counters.setdefault(name, 0)
        found = self.resident[index].get(number)
        if found is not None:
            self.counters["expert_hits"] += 1
            return found
        self.counters["expert_misses"] += 1
        if self.profiler is None:
            return self._read(index, number)
        return self.profiler("expert_load", self._read, index, number)

    def choose_popular(self) -> None:
        """Make each layer's cache its ``cached`` most-routed experts so far, then restart the count."""
        for index, counts in self.counts.items():
            popular = np.argsort(-counts, kind="stable")[:self.cached].tolist()
            kept = self.resident[index]
            self.resident[index] = {e: kept[e] if e in kept else self._load(index, e)
                                    for e in sorted(popular)}
            self._install(index)
            counts[:] = 0

    def describe(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "experts_per_layer": self.num_experts,
                "cached_per_layer": self.cached, "expert_bytes": self.expert_bytes,
                "disk_bytes": self.disk_bytes,
                "resident": {str(i): sorted(r) for i, r in self.resident.items()}}

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            shutil.rmtree(self.folder, ignore_errors=True)
        except Exception:
            pass
