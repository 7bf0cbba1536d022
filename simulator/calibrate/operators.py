"""Fit a GPU's efficiency parameters to per-operator timings, and a node's to collective timings.

    python -m simulator.calibrate.operators --profiles ../shared/measurements/vidur --write

What is fitted describes the device and its kernel library, never a model or
a shape: the fixed cost of a kernel and of a GEMM call, how achieved bandwidth
ramps with bytes moved, the fraction of a compute unit's peak a GEMM tile
reaches and the rate the cache feeds tiles, and how close each kind of kernel
gets to the bandwidth. Collectives: a fixed cost per call and, per link, the hop latency
and the achievable fraction of bandwidth. The fit minimises a robust
(soft-L1) loss on log(predicted / measured) with scipy's least_squares.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy.optimize import least_squares

from simulator.cost.roofline import cost_op
from simulator.graph.ops import Op
from simulator.specs.fields import EfficiencyCurve
from simulator.specs.hardware import (
    CollectiveSpec,
    Device,
    DeviceEfficiency,
    GemmTiling,
    KernelEfficiency,
    System,
)

KERNEL_KINDS = ("gemm", "norm", "rope", "activation", "embedding", "elementwise")
FIT_MARKER = "# --- fitted: written by `python -m simulator.calibrate.operators` ---"


# --- devices ------------------------------------------------------------------------------

def device_params(kinds: tuple[str, ...] = KERNEL_KINDS, max_bandwidth: float | dict[str, float] = 1.0,
                  call_overhead: bool = False) -> list[tuple[str, float, float, float]]:
    """(name, lower, upper, initial) of every fitted device parameter, in the optimiser's coordinates.

    ``max_bandwidth`` bounds each kind's bandwidth as a multiple of main memory's (one bound, or
    one per kind, 1 for kinds not named): 1 on a GPU (HBM feeds every kernel); on a CPU whose
    main-memory rate is one core's stream, up to the cores for kernels that stream on all of them.
    ``call_overhead`` adds the fixed cost of a GEMM call (``gemm.call_overhead``; fitted on GPUs).
    """
    caps = max_bandwidth if isinstance(max_bandwidth, dict) else {}
    default = 1.0 if isinstance(max_bandwidth, dict) else max_bandwidth
    return [
        ("log10_kernel_overhead_s", -7.0, -4.0, -5.5),
        ("gemm_efficiency", 0.3, 1.0, 0.8),
        ("log10_operand_bandwidth", 10.0, 14.5, 13.0),
        ("log10_tile_overhead_s", -8.0, -4.5, -6.5),
        *([("log10_gemm_call_overhead_s", -7.0, -4.0, -5.5)] if call_overhead else []),
        *[(f"{kind}_bandwidth", 0.02, caps.get(kind, default), 0.8) for kind in kinds],
        *[(f"log10_{kind}_half_bytes", 2.0, 9.0, 6.0) for kind in kinds],
        *[(f"log10_{kind}_floor_s", -7.0, -3.0, -5.5) for kind in kinds],
    ]


DEVICE_PARAMS = device_params(call_overhead=True)


def device_with(base: Device, x: np.ndarray, provenance: str, fit: dict | None = None,
                kinds: tuple[str, ...] = KERNEL_KINDS, call_overhead: bool = False) -> Device:
    # The names do not depend on the bounds.
    names = [p[0] for p in device_params(kinds, call_overhead=call_overhead)]
    values = dict(zip(names, map(float, x), strict=True))
    call = 10 ** values["log10_gemm_call_overhead_s"] if call_overhead else 0.0
    # The tile shapes are the kernel library's, not fitted: a base that names them keeps them.
    given = base.efficiency.gemm
    tiling = {} if given is None else {"tiles": given.tiles, "split_k": given.split_k,
                                       "pack_pass": given.pack_pass}
    efficiency = DeviceEfficiency(
        compute=base.efficiency.compute,
        memory=base.efficiency.memory,
        kernel_overhead=10 ** values["log10_kernel_overhead_s"],
        expert_loop=base.efficiency.expert_loop,
        gemm=GemmTiling(efficiency=values["gemm_efficiency"],
                        operand_bandwidth=10 ** values["log10_operand_bandwidth"],
                        tile_overhead=10 ** values["log10_tile_overhead_s"], call_overhead=call,
                        **tiling),
        kernels={kind: KernelEfficiency(bandwidth=values[f"{kind}_bandwidth"],
                                        half_size=10 ** values[f"log10_{kind}_half_bytes"],
                                        floor=10 ** values[f"log10_{kind}_floor_s"])
                 for kind in kinds},
        provenance=provenance,
        fit=fit,
    )
    return base.model_copy(update={"efficiency": efficiency})


def _robust_fit(residuals, params: list[tuple[str, float, float, float]]) -> Any:
    lower = np.array([p[1] for p in params])
    upper = np.array([p[2] for p in params])
    start = np.array([p[3] for p in params])
    return least_squares(residuals, start, bounds=(lower, upper), loss="soft_l1", f_scale=0.05,
                         x_scale="jac", max_nfev=400)


def _residual_stats(log_ratio: np.ndarray) -> dict[str, float]:
    rel = np.abs(np.expm1(log_ratio))
    return {"median_abs_rel_error": float(np.median(rel)), "p90_abs_rel_error": float(np.quantile(rel, 0.9)),
            "rows": int(rel.size)}


def fit_device(base: Device, frame: pd.DataFrame) -> tuple[Device, dict[str, Any]]:
    """Efficiencies of ``base`` fitted to ``frame`` (rows of ``validation.vidur.read_compute``)."""
    from validation.vidur import evaluate_compute, prepare_compute

    measured = np.log(frame["measured_s"].to_numpy())
    prepared = prepare_compute(frame)

    def residuals(x: np.ndarray) -> np.ndarray:
        device = device_with(base, x, "fitting", call_overhead=True)
        return np.log(evaluate_compute(prepared, len(frame), lambda g, m: device)) - measured

    result = _robust_fit(residuals, DEVICE_PARAMS)
    info = {
        "method": "scipy least_squares, soft-L1 loss on log(predicted/measured)",
        "models": sorted(frame["model"].unique()),
        "parameters": dict(zip([p[0] for p in DEVICE_PARAMS], map(float, result.x), strict=True)),
        "residuals": _residual_stats(result.fun),
    }
    return device_with(base, result.x, "fitted", info, call_overhead=True), info


def fit_device_to_ops(base: Device, ops: list[tuple[Op, ...]], measured_s: np.ndarray,
                      kinds: tuple[str, ...] = KERNEL_KINDS,
                      max_bandwidth: float | dict[str, float] = 1.0) -> tuple[Device, dict[str, Any]]:
    """Efficiencies of ``base`` fitted so that the summed time of the ops in ``ops[i]`` matches
    ``measured_s[i]`` (several ops when one timed call runs several kernels).
    """
    measured = np.log(np.asarray(measured_s, dtype=float))
    params = device_params(kinds, max_bandwidth)

    def residuals(x: np.ndarray) -> np.ndarray:
        device = device_with(base, x, "fitting", kinds=kinds)
        predicted = [sum(float(np.mean(cost_op(op, device).total_s)) for op in group) for group in ops]
        return np.log(predicted) - measured

    result = _robust_fit(residuals, params)
    info = {
        "method": "scipy least_squares, soft-L1 loss on log(predicted/measured)",
        "parameters": dict(zip([p[0] for p in params], map(float, result.x), strict=True)),
        "residuals": _residual_stats(result.fun),
    }
    return device_with(base, result.x, "fitted", info, kinds), info


def fit_kernel_kinds(base: Device, ops: list[tuple[Op, ...]], measured_s: np.ndarray,
                     kinds: tuple[str, ...]) -> tuple[Device, dict[str, Any]]:
    """Only ``kinds``' bandwidth, half size and floor fitted to their own microbenchmarks, every
    other parameter of ``base`` held (a kind whose few points a joint fit would treat as outliers)."""
    params = [row for kind in kinds for row in (
        (f"{kind}_bandwidth", 0.005, 1.0, 0.3), (f"log10_{kind}_half_bytes", 2.0, 9.0, 5.0),
        (f"log10_{kind}_floor_s", -7.0, -3.0, -5.5))]
    measured = np.log(np.asarray(measured_s, dtype=float))

    def device_for(x: np.ndarray) -> Device:
        values = dict(zip([p[0] for p in params], map(float, x), strict=True))
        kernels = {**base.efficiency.kernels, **{kind: KernelEfficiency(
            bandwidth=values[f"{kind}_bandwidth"], half_size=10 ** values[f"log10_{kind}_half_bytes"],
            floor=10 ** values[f"log10_{kind}_floor_s"]) for kind in kinds}}
        return base.model_copy(update={"efficiency": base.efficiency.model_copy(update={"kernels": kernels})})

    def residuals(x: np.ndarray) -> np.ndarray:
        device = device_for(x)
        predicted = [sum(float(np.mean(cost_op(op, device).total_s)) for op in group) for group in ops]
        return np.log(predicted) - measured

    lower, upper = np.array([p[1] for p in params]), np.array([p[2] for p in params])
    result = least_squares(residuals, np.array([p[3] for p in params]), bounds=(lower, upper),
                           x_scale="jac", max_nfev=400)
    info = {"method": "scipy least_squares on log(predicted/measured), these kinds alone",
            "parameters": dict(zip([p[0] for p in params], map(float, result.x), strict=True)),
            "residuals": _residual_stats(result.fun)}
    return device_for(result.x), info


# --- systems ------------------------------------------------------------------------------

ALGORITHM_LATENCIES = ("ring", "tree", "nvls", "send_recv")
SYSTEM_PARAMS = [
    ("log10_launch_s", -7.0, -3.5, -5.0),
    *[(f"log10_{name}_latency_s", -7.0, -3.5, -5.5) for name in ALGORITHM_LATENCIES],
    ("log10_intra_latency_s", -7.5, -4.0, -5.5),
    ("intra_efficiency", 0.2, 1.0, 0.8),
    ("log10_inter_latency_s", -7.5, -4.0, -5.0),
    ("inter_efficiency", 0.2, 1.0, 0.8),
    ("send_recv_efficiency", 0.5, 2.0, 1.0),
]


def system_with(base: System, x: np.ndarray, provenance: str, fit: dict | None = None) -> System:
    values = dict(zip([p[0] for p in SYSTEM_PARAMS], map(float, x), strict=True))
    links = base.links
    update = {}
    if links.intra_node is not None:
        update["intra_node"] = links.intra_node.model_copy(update={
            "latency": 10 ** values["log10_intra_latency_s"], "efficiency": values["intra_efficiency"]})
    if links.inter_node is not None:
        update["inter_node"] = links.inter_node.model_copy(update={
            "latency": 10 ** values["log10_inter_latency_s"], "efficiency": values["inter_efficiency"]})
    collectives = CollectiveSpec(
        launch=10 ** values["log10_launch_s"], algorithms=base.collectives.algorithms,
        latency={name: 10 ** values[f"log10_{name}_latency_s"] for name in ALGORITHM_LATENCIES
                 if name in base.collectives.algorithms or name == "send_recv"},
        efficiency={"send_recv": values["send_recv_efficiency"]},
        provenance=provenance, fit=fit)
    return base.model_copy(update={"links": links.model_copy(update=update), "collectives": collectives})


def fit_system(base: System, frame: pd.DataFrame) -> tuple[System, dict[str, Any]]:
    """Collective software costs and link latencies and efficiencies fitted to ``frame``; where it
    has all-reduces across nodes of several devices each, also how many NICs a node's devices
    share (``inter_node.ports_per_node``: 1, 2, 4, ... or one per device), the best fit kept."""
    from validation.vidur import predict_network

    measured = np.log(frame["measured_s"].to_numpy())
    inter = base.links.inter_node
    across = frame["num_workers"] > frame["devices_per_node"]
    shared_nodes = (across & (frame["devices_per_node"] > 1)).any()
    candidates: list[int | None] = [None]
    if inter is not None and shared_nodes:
        candidates += [p for p in (1, 2, 4, 8) if p < base.devices_per_node]
    best: tuple[Any, System] | None = None
    for ports in candidates:
        candidate = base
        if inter is not None:
            candidate = base.model_copy(update={"links": base.links.model_copy(update={
                "inter_node": inter.model_copy(update={"ports_per_node": ports})})})

        def residuals(x: np.ndarray, start: System = candidate) -> np.ndarray:
            system = system_with(start, x, "fitting")
            return np.log(predict_network(frame, lambda n: system)) - measured

        result = _robust_fit(residuals, SYSTEM_PARAMS)
        if best is None or result.cost < best[0].cost:
            best = (result, candidate)
    assert best is not None
    result, chosen = best
    ports = chosen.links.inter_node.ports_per_node if chosen.links.inter_node is not None else None
    info = {
        "method": "scipy least_squares, soft-L1 loss on log(predicted/measured)"
                  + ("; NICs per node chosen by the lowest cost" if len(candidates) > 1 else ""),
        "parameters": dict(zip([p[0] for p in SYSTEM_PARAMS], map(float, result.x), strict=True)),
        "inter_node_ports": ports,
        "residuals": _residual_stats(result.fun),
    }
    return system_with(chosen, result.x, "fitted", info), info


# --- writing fitted values into shipped specs --------------------------------------------

def _fmt_seconds(value: float) -> str:
    return f"{value * 1e6:.3g} us"


def _fmt_bytes(value: float) -> str:
    return f"{value / 1e6:.4g} MB"


def _fmt_bandwidth(value: float) -> str:
    return f"{value / 1e12:.4g} TB/s"


def device_fit_yaml(device: Device, source: str, command: str) -> str:
    eff = device.efficiency
    assert eff.gemm is not None and eff.fit is not None
    fit = {**eff.fit, "source": source, "command": command, "date": dt.date.today().isoformat()}
    block = {
        "efficiency": {
            "compute": _curve_yaml(eff.compute),
            "memory": _curve_yaml(eff.memory),
            "kernel_overhead": _fmt_seconds(eff.kernel_overhead),
            "gemm": {
                "tiles": [list(t) for t in eff.gemm.tiles],
                "split_k": list(eff.gemm.split_k),
                "efficiency": round(eff.gemm.efficiency, 4),
                "operand_bandwidth": _fmt_bandwidth(eff.gemm.operand_bandwidth or 0),
                "tile_overhead": _fmt_seconds(eff.gemm.tile_overhead),
                "call_overhead": _fmt_seconds(eff.gemm.call_overhead),
            },
            "kernels": {
                kind: {"bandwidth": round(k.bandwidth, 4), "half_size": _fmt_bytes(k.half_size),
                       "floor": _fmt_seconds(k.floor)}
                for kind, k in eff.kernels.items()
            },
            "provenance": f"fitted to {source} (see fit); compute curve: default, not fitted",
            "fit": _round(fit),
        }
    }
    return yaml.safe_dump(block, sort_keys=False, width=100)


def system_fit_yaml(system: System, source: str, command: str) -> str:
    spec = system.collectives
    assert spec.fit is not None
    fit = {**spec.fit, "source": source, "command": command, "date": dt.date.today().isoformat()}
    links = {}
    for name in ("intra_node", "inter_node"):
        link = getattr(system.links, name)
        if link is not None:
            links[name] = {"latency": _fmt_seconds(link.latency), "efficiency": round(link.efficiency, 4)}
            if link.ports_per_node is not None:
                links[name]["ports_per_node"] = link.ports_per_node
    block = {
        "collectives": {
            "launch": _fmt_seconds(spec.launch),
            "algorithms": list(spec.algorithms),
            "latency": {name: _fmt_seconds(value) for name, value in spec.latency.items()},
            "efficiency": {name: round(value, 4) for name, value in spec.efficiency.items()},
            "provenance": f"fitted to {source} (see fit)",
            "fit": _round(fit),
        },
        "fitted_links": links,
    }
    return yaml.safe_dump(block, sort_keys=False, width=100)


def _curve_yaml(curve: EfficiencyCurve) -> Any:
    if curve.peak is not None:
        return {"peak": curve.peak, "half_size": curve.half_size}
    return curve.points[0][1] if len(curve.points) == 1 else [list(p) for p in curve.points]


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def replace_fitted_block(path: Path, block: str) -> None:
    """Replace everything after the fit marker (or the ``efficiency:`` block) with ``block``."""
    text = path.read_text()
    if FIT_MARKER in text:
        text = text[: text.index(FIT_MARKER)]
    else:
        match = re.search(r"^(efficiency|collectives):.*\Z", text, flags=re.M | re.S)
        if match:
            text = text[: match.start()]
    path.write_text(text.rstrip("\n") + "\n" + FIT_MARKER + "\n" + block)


def main(argv: Sequence[str] | None = None) -> int:
    from simulator.specs.loader import load_device, load_system, shipped_devices, shipped_systems
    from validation.vidur import GPU_SPECS, NODE_SPECS, read_compute, read_network

    parser = argparse.ArgumentParser(prog="python -m simulator.calibrate.operators",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", required=True, type=Path)
    parser.add_argument("--write", action="store_true", help="write the fits into the shipped specs")
    args = parser.parse_args(argv)
    command = "python -m simulator.calibrate.operators --profiles PROFILES --write"
    compute, network = read_compute(args.profiles), read_network(args.profiles)
    for gpu, frame in compute.groupby("gpu"):
        name = GPU_SPECS[gpu]
        fitted, info = fit_device(load_device(name), frame.reset_index(drop=True))
        print(f"{name}: {info['residuals']}")
        if args.write:
            source = f"Vidur profiles compute/{gpu}/*/*/mlp.csv ({', '.join(info['models'])})"
            replace_fitted_block(shipped_devices()[name], device_fit_yaml(fitted, source, command))
    for node, frame in network.groupby("node"):
        name = NODE_SPECS[node]
        fitted, info = fit_system(load_system(name), frame.reset_index(drop=True))
        print(f"{name}: {info['residuals']}")
        if args.write:
            source = f"Vidur profiles network/{node}/{{all_reduce,send_recv}}.csv"
            replace_fitted_block(shipped_systems()[name], system_fit_yaml(fitted, source, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
