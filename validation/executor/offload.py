"""Layers whose weights live on disk and are read back every step, as an offloading runtime does.

The last ``n`` layers are written once, each to its own file (its arrays back
to back), and dropped from memory. Every step reads each of them again with
the page cache told to drop the file first (``posix_fadvise(DONTNEED)``), so
the read comes from the drive, not from memory. Two layer-sized buffers are
reused:

* without prefetch, ``layer(i)`` reads layer ``i`` when the step reaches it;
* with prefetch, a reader thread reads the next offloaded layer into the
  other buffer while the current one computes (file reads and BLAS both
  release the GIL), and the first offloaded layer's read starts with the
  step, under the resident layers' compute.

Time the step spends waiting for a read is recorded as the op ``weight_load``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from validation.executor.model import _convert
from validation.executor.weights import LayerWeights

CHUNK = 2**20  # bytes per read call, as calibration's disk benchmark reads


def _arrays(tree: Any) -> list[np.ndarray]:
    """Every array of a layer's weight tree, in the order ``_convert`` visits them."""
    found: list[np.ndarray] = []
    _convert(tree, lambda array: found.append(array) or array)
    return found


Layout = list[tuple[tuple[int, ...], np.dtype, int]]


def write_tree(path: Path, tree: Any) -> tuple[Layout, int]:
    """Write a weight tree's arrays back to back to ``path`` (synced to the drive); returns each
    array's (shape, dtype, offset) and the bytes written."""
    layout: Layout = []
    offset = 0
    with open(path, "wb") as handle:
        for array in _arrays(tree):
            data = np.ascontiguousarray(array)
            handle.write(data.tobytes())
            layout.append((data.shape, data.dtype, offset))
            offset += data.nbytes
        handle.flush()
        os.fsync(handle.fileno())
    return layout, offset


def tree_views(template: Any, layout: Layout, buffer: np.ndarray) -> Any:
    """``template`` (a tree of empty arrays) filled with views of ``buffer`` as ``layout`` says."""
    views = iter([buffer[offset:offset + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)
                  for shape, dtype, offset in layout])
    return _convert(template, lambda _: next(views))


class DiskLayers:
    """The model's layer list, with ``offloaded`` layers served from files."""

    def __init__(self, layers: list[LayerWeights], offloaded: int, prefetch: bool,
                 folder: Path | None = None):
        if not 0 <= offloaded <= len(layers):
            raise ValueError(f"offloaded layers must be between 0 and {len(layers)}")
        self.count = len(layers)
        self.first = len(layers) - offloaded
        self.resident = layers[:self.first]
        self.folder = Path(tempfile.mkdtemp(prefix="infersim-layers-", dir=folder))
        self.files: list[Path] = []
        self.layouts: list[Layout] = []
        # Each offloaded layer stays as a tree of empty arrays; a read fills in views of a buffer.
        self.templates: list[LayerWeights] = []
        size = self.file_bytes = 0
        for index, layer in enumerate(layers[self.first:], start=self.first):
            path = self.folder / f"layer-{index}.bin"
            layout, offset = write_tree(path, layer)
            self.files.append(path)
            self.layouts.append(layout)
            self.templates.append(_convert(layer, lambda array: np.empty(0, array.dtype)))
            size = max(size, offset)
            self.file_bytes += offset
        self.layer_bytes = size
        self.buffers = [np.empty(size, np.uint8) for _ in range(2 if offloaded else 0)]
        self.pool = ThreadPoolExecutor(max_workers=1) if prefetch and offloaded else None
        self.pending: dict[int, Future] = {}
        self.profiler: Any = None
        self.bytes_read = 0

    @property
    def buffer_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def _read(self, index: int) -> LayerWeights:
        from simulator.calibrate.host import read_file_into  # the read calibration times

        slot = index - self.first
        buffer = self.buffers[slot % 2]
        done = read_file_into(self.files[slot], buffer[:self.layer_bytes], CHUNK)
        self.bytes_read += done
        return tree_views(self.templates[slot], self.layouts[slot], buffer)

    def begin_step(self) -> None:
        """Start reading the first offloaded layer (prefetch), under the resident layers."""
        if self.pool is not None and self.first < self.count and self.first not in self.pending:
            self.pending[self.first] = self.pool.submit(self._read, self.first)

    def layer(self, index: int) -> LayerWeights:
        if index < self.first:
            return self.resident[index]
        if self.pool is None:
            return self._load(lambda: self._read(index))
        future = self.pending.pop(index, None) or self.pool.submit(self._read, index)
        layer = self._load(future.result)
        if index + 1 < self.count:
            # Layer index's buffer is busy until it has computed; index + 1 goes to the other one.
            self.pending[index + 1] = self.pool.submit(self._read, index + 1)
        return layer

    def _load(self, fn: Any) -> LayerWeights:
        if self.profiler is None:
            return fn()
        return self.profiler("weight_load", fn)

    def close(self) -> None:
        for future in self.pending.values():
            future.result()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            shutil.rmtree(self.folder, ignore_errors=True)
        except Exception:
            pass
