"""GEMM compute time from output tiles and waves over the compute units.

The best analytical GPU models (LLMCompass, Calculon) cost a GEMM by how its
output divides into tiles and how the tiles fill the streaming
multiprocessors; see ``GemmTiling`` for the rule and ``docs/model.md`` for
the equation. Everything here is vectorized over ``m`` so one call costs a
GEMM at many token counts.
"""

from __future__ import annotations

import numpy as np

from simulator.graph.ops import Quantity
from simulator.specs.hardware import Device, GemmTiling


def gemm_compute_s(m: Quantity, n: float, k: float, peak_flops: float, device: Device,
                   tiling: GemmTiling, operand_bytes: float) -> Quantity:
    """Time of the fastest tiling: ``waves * max(tile math, tile operand traffic)``."""
    units = device.compute_units
    assert units is not None
    unit_rate = peak_flops * tiling.efficiency / units
    unit_bw = tiling.operand_bandwidth / units if tiling.operand_bandwidth else None
    m = np.asarray(m, dtype=float)
    best = np.full(m.shape, np.inf)
    for tm, tn in tiling.tiles:
        tiles = np.ceil(m / tm) * np.ceil(n / tn)
        for split in tiling.split_k:
            if split > 1 and k / split < 128:
                continue
            slice_k = k / split
            tile_s = 2.0 * tm * tn * slice_k / unit_rate
            if unit_bw is not None:
                tile_s = max(tile_s, (tm + tn) * slice_k * operand_bytes / unit_bw)
            tile_s += tiling.tile_overhead
            best = np.minimum(best, np.ceil(tiles * split / units) * tile_s)
    return best if best.ndim else float(best)
