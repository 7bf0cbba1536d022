"""GEMM compute time from output tiles and waves over the compute units.

The best analytical GPU models (LLMCompass, Calculon) cost a GEMM by how its
output divides into tiles and how the tiles fill the streaming
multiprocessors; see ``GemmTiling`` for the rule and ``docs/model.md`` for
the equation. All candidate tilings are evaluated at once with numpy
broadcasting, over every ``m`` given, so one call costs a GEMM at many token
counts.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from simulator.graph.ops import Quantity
from simulator.specs.hardware import Device, GemmTiling


@lru_cache(maxsize=64)
def _candidates(tiling: GemmTiling, k: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tile rows, tile columns and k-splits of every candidate tiling (column vectors)."""
    rows = [(tm, tn, split) for tm, tn in tiling.tiles for split in tiling.split_k
            if split == 1 or k / split >= 128]
    tm, tn, split = (np.array(col, dtype=float)[:, None] for col in zip(*rows, strict=True))
    return tm, tn, split


def gemm_compute_s(m: Quantity, n: float, k: float, peak_flops: float, device: Device,
                   tiling: GemmTiling, operand_bytes: float, groups: Quantity = 1.0) -> Quantity:
    """Time of the fastest tiling: ``waves * (max(tile math, tile operand traffic) + tile_overhead)``.

    ``groups`` GEMMs of ``m`` rows each (a grouped GEMM) share the waves: their tiles are
    scheduled together over the compute units.
    """
    units = device.compute_units
    assert units is not None
    tm, tn, split = _candidates(tiling, float(k))
    slice_k = k / split
    tile_s = 2.0 * tm * tn * slice_k / (peak_flops * tiling.efficiency / units)
    if tiling.operand_bandwidth:
        tile_s = np.maximum(tile_s, (tm + tn) * slice_k * operand_bytes / (tiling.operand_bandwidth / units))
    tile_s = tile_s + tiling.tile_overhead
    m_row = np.atleast_1d(np.asarray(m, dtype=float))[None, :]
    groups_row = np.atleast_1d(np.asarray(groups, dtype=float))[None, :]
    waves = np.ceil(np.ceil(m_row / tm) * np.ceil(n / tn) * split * groups_row / units)
    best = (waves * tile_s).min(axis=0)
    return best if np.ndim(m) else float(best[0])
