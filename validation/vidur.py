"""Predicted vs measured on real GPUs: Vidur's per-operator and NCCL profiles.

    python -m validation.vidur --profiles ../shared/measurements/vidur --json report.json \
        [--markdown report.md] [--plots DIR] [--datasheet | --lomo] \
        [--max-median-error 0.1] [--max-p90-error 0.2] [--hardware-map a40=path.yaml]

Reads every ``compute/<gpu>/<org>/<model>/mlp.csv`` and
``network/<node>/<collective>.csv`` under the profiles folder, builds each
model's shape from the CSV's own columns, and predicts every operator of
every row with the simulator's own op graph and costs (the per-shard shape
for TP > 1). Modes: the shipped specs as they are (default); ``--datasheet``,
the same specs with the default, unfitted efficiencies; ``--lomo``,
leave-one-model-out: each model predicted from efficiencies fitted on the
other models of its GPU only (collectives: each size predicted from a fit
that left out every size within a factor of two of it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simulator.cost.collectives import collective_time_s
from simulator.cost.roofline import cost_op
from simulator.errors import InferSimError
from simulator.graph.ops import Op
from simulator.graph.transformer import Precision, StepShape, build_step
from simulator.specs.hardware import Device, DeviceEfficiency, System
from simulator.specs.loader import load_device, load_system
from simulator.specs.model import ModelSpec
from simulator.strategies.parallel import shard_for_tp

GPU_SPECS = {"a100": "a100-80gb-sxm", "h100": "h100-sxm", "a40": "a40", "l40s": "l40s"}
NODE_SPECS = {"a100_dgx": "dgx-a100", "h100_dgx": "dgx-h100"}
# Vidur's operator names -> the simulator's op names (docs/validation.md explains each).
OPS = {
    "emb": "embedding",
    "input_layernorm": "input_norm",
    "attn_pre_proj": "qkv_proj",
    "attn_rope": "rope",
    "attn_post_proj": "o_proj",
    "post_attention_layernorm": "post_attention_norm",
    "mlp_up_proj": "mlp_up_proj",
    "mlp_act": "mlp_act",
    "mlp_down_proj": "mlp_down_proj",
    "add": "residual_add",
}
GEMM_OPS = {"attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj"}
SHAPE_COLUMNS = ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp"]
FP16 = Precision(weight="fp16", kv="fp16", act="fp16", compute="fp16")
MIB = 2**20


class ProfileError(InferSimError):
    pass


# --- reading ------------------------------------------------------------------------------

def read_compute(profiles: Path) -> pd.DataFrame:
    """One row per (gpu, model, num_tokens, tp, op) with the median time in seconds."""
    frames = []
    for path in sorted(profiles.glob("compute/*/*/*/mlp.csv")):
        gpu, org, model = path.parts[-4], path.parts[-3], path.parts[-2]
        raw = pd.read_csv(path)
        needed = SHAPE_COLUMNS + ["num_tokens", "num_tensor_parallel_workers"]
        missing = [c for c in needed if c not in raw.columns]
        if missing:
            raise ProfileError(f"{path}: missing columns {', '.join(missing)}")
        for vidur_op in OPS:
            column = f"time_stats.{vidur_op}.median"
            if column not in raw.columns:
                continue
            part = raw[needed].copy()
            part["measured_s"] = raw[column] / 1e3
            part["op"] = vidur_op
            part["gpu"] = gpu
            part["model"] = f"{org}/{model}"
            frames.append(part)
    if not frames:
        raise ProfileError(f"{profiles}: no compute/<gpu>/<org>/<model>/mlp.csv found")
    frame = pd.concat(frames, ignore_index=True)
    frame = frame.rename(columns={"num_tensor_parallel_workers": "tp"})
    frame = frame[frame["measured_s"] > 0].reset_index(drop=True)
    frame["op_class"] = np.where(frame["op"].isin(GEMM_OPS), "gemm", "elementwise")
    return frame


def read_network(profiles: Path) -> pd.DataFrame:
    frames = []
    for path in sorted(profiles.glob("network/*/*.csv")):
        raw = pd.read_csv(path)
        collective = path.stem
        column = f"time_stats.{collective}.median"
        needed = [column, "num_workers", "size", "devices_per_node"]
        missing = [c for c in needed if c not in raw.columns]
        if missing:
            raise ProfileError(f"{path}: missing columns {', '.join(missing)}")
        part = pd.DataFrame({
            "node": path.parent.name,
            "collective": collective,
            "num_workers": raw["num_workers"],
            "devices_per_node": raw["devices_per_node"],
            # Bytes already: Vidur's collectives_wrapper.py records `size * 2` (fp16 elements
            # times two) in this column, although the shared README calls it elements.
            "size_bytes": raw["size"],
            "measured_s": raw[column] / 1e3,
        })
        # Every rank reports; one row per (shape, size) is enough: take the median over ranks.
        keys = ["node", "collective", "num_workers", "devices_per_node", "size_bytes"]
        frames.append(part.groupby(keys, as_index=False)["measured_s"].median())
    if not frames:
        return pd.DataFrame(columns=["node", "collective", "num_workers", "devices_per_node",
                                     "size_bytes", "measured_s"])
    frame = pd.concat(frames, ignore_index=True)
    frame["op_class"] = "collective"
    return frame


def model_from_shape(name: str, shape: pd.Series) -> ModelSpec:
    heads = int(shape["n_head"])
    return ModelSpec(
        name=name, architecture="LlamaForCausalLM", source="Vidur profile columns",
        num_layers=1, hidden_size=int(shape["n_embd"]), num_attention_heads=heads,
        num_kv_heads=int(shape["n_kv_head"]), head_dim=int(shape["n_embd"]) // heads,
        ffn={"intermediate_size": int(shape["n_expanded_embd"]), "gated": bool(shape["use_gated_mlp"])},
        vocab_size=int(shape["vocab_size"]),
    )


# --- predicting ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PreparedOp:
    """One op of one (gpu, model, tp) group, built at every token count the rows ask for."""

    gpu: str
    model: str
    op: Op
    rows: np.ndarray
    token_index: np.ndarray


def prepare_compute(frame: pd.DataFrame) -> list[PreparedOp]:
    """Build the op graph once per (gpu, model, tp); costing it is then the only per-fit work."""
    prepared = []
    for (gpu, model_name, tp), group in frame.groupby(["gpu", "model", "tp"], sort=False):
        model = shard_for_tp(model_from_shape(model_name, group.iloc[0][SHAPE_COLUMNS]), int(tp))
        tokens = np.sort(group["num_tokens"].unique()).astype(float)
        ops = {op.name: op for op in build_step(model, StepShape("decode", tokens, 1, 1.0), FP16)}
        for vidur_op, rows in group.groupby("op", sort=False):
            index = np.searchsorted(tokens, rows["num_tokens"].to_numpy())
            prepared.append(PreparedOp(gpu, model_name, ops[OPS[vidur_op]], rows.index.to_numpy(), index))
    return prepared


def evaluate_compute(prepared: list[PreparedOp], size: int,
                     device_for: Callable[[str, str], Device]) -> np.ndarray:
    predicted = np.full(size, np.nan)
    for item in prepared:
        times = np.atleast_1d(cost_op(item.op, device_for(item.gpu, item.model)).time_s)
        predicted[item.rows] = times[item.token_index]
    return predicted


def predict_compute(frame: pd.DataFrame, device_for: Callable[[str, str], Device]) -> np.ndarray:
    """Predicted seconds for every row; ``device_for(gpu, model)`` gives the device spec to use."""
    return evaluate_compute(prepare_compute(frame), len(frame), device_for)


def predict_network(frame: pd.DataFrame, system_for: Callable[[str], System]) -> np.ndarray:
    predicted = np.full(len(frame), np.nan)
    for (node, collective, workers, per_node), rows in frame.groupby(
            ["node", "collective", "num_workers", "devices_per_node"], sort=False):
        predicted[rows.index] = collective_time_s(
            system_for(node), collective, rows["size_bytes"].to_numpy(float), int(workers), int(per_node))
    return predicted


# --- modes ---------------------------------------------------------------------------------

def datasheet(device: Device) -> Device:
    return device.model_copy(update={"efficiency": DeviceEfficiency()})


def datasheet_system(name_or_path: str) -> System:
    """The system as its datasheet values give it: the spec file without its fitted block."""
    import yaml

    from simulator.specs.loader import datasheet_text, shipped_systems, validate

    path = shipped_systems().get(name_or_path, Path(name_or_path))
    data = yaml.safe_load(datasheet_text(path))
    data["device"] = load_device(data["device"]) if isinstance(data["device"], str) else data["device"]
    return validate(System, data, str(path))


def lomo_compute(frame: pd.DataFrame, devices: dict[str, Device]) -> np.ndarray:
    """Leave one model out: each model predicted from a fit on its GPU's other models."""
    from simulator.calibrate.operators import fit_device

    predicted = np.full(len(frame), np.nan)
    for gpu, on_gpu in frame.groupby("gpu", sort=False):
        for model in on_gpu["model"].unique():
            train = on_gpu[on_gpu["model"] != model]
            test = on_gpu[on_gpu["model"] == model]
            if train.empty:
                continue  # a GPU profiled on one model only has nothing to fit on
            fitted, _ = fit_device(devices[gpu], train.reset_index(drop=True))
            predicted[test.index] = predict_compute(test.reset_index(drop=True), lambda g, m, d=fitted: d)
    return predicted


def holdout_network(frame: pd.DataFrame, systems: dict[str, System]) -> np.ndarray:
    """Each size predicted from a fit without any size within a factor of two of it."""
    from simulator.calibrate.operators import fit_system

    predicted = np.full(len(frame), np.nan)
    for node, on_node in frame.groupby("node", sort=False):
        sizes = np.sort(on_node["size_bytes"].unique())
        folds = np.floor(np.log2(sizes)).astype(int) % 3
        for fold in range(3):
            held = set(sizes[folds == fold])
            test = on_node[on_node["size_bytes"].isin(held)]
            train = on_node[~on_node["size_bytes"].isin(held)]
            fitted, _ = fit_system(systems[node], train.reset_index(drop=True))
            predicted[test.index] = predict_network(test.reset_index(drop=True), lambda n, s=fitted: s)
    return predicted


# --- summarizing --------------------------------------------------------------------------

def _stats(errors: pd.Series) -> dict[str, float]:
    errors = errors.dropna().abs()
    return {"median": float(errors.median()), "p90": float(errors.quantile(0.9)),
            "count": int(errors.size)}


def summarize(compute: pd.DataFrame, network: pd.DataFrame) -> dict[str, Any]:
    summary: dict[str, Any] = {"by_class": {}, "by_gpu": {}, "by_op": {}, "by_node": {}}
    for op_class, part in compute.groupby("op_class"):
        summary["by_class"][op_class] = _stats(part["rel_error"])
    for (gpu, op_class), part in compute.groupby(["gpu", "op_class"]):
        summary["by_gpu"].setdefault(gpu, {})[op_class] = _stats(part["rel_error"])
    for op, part in compute.groupby("op"):
        summary["by_op"][op] = _stats(part["rel_error"])
    if not network.empty:
        large = network["size_bytes"] >= MIB
        summary["by_class"]["collective_1mib_and_more"] = _stats(network.loc[large, "rel_error"])
        summary["by_class"]["collective_below_1mib"] = _stats(network.loc[~large, "rel_error"])
        for (node, coll), part in network.groupby(["node", "collective"]):
            big = part["size_bytes"] >= MIB
            summary["by_node"].setdefault(node, {})[coll] = {
                "1mib_and_more": _stats(part.loc[big, "rel_error"]),
                "below_1mib": _stats(part.loc[~big, "rel_error"]),
            }
    return summary


def markdown(summary: dict[str, Any], compute: pd.DataFrame, mode: str) -> str:
    lines = [f"# Vidur operator validation ({mode})", "",
             "| class | median abs error | p90 abs error | rows |", "|---|---|---|---|"]
    for name, s in summary["by_class"].items():
        lines.append(f"| {name} | {s['median']:.1%} | {s['p90']:.1%} | {s['count']} |")
    lines += ["", "| gpu | class | median | p90 | rows |", "|---|---|---|---|---|"]
    for gpu, classes in summary["by_gpu"].items():
        for name, s in classes.items():
            lines.append(f"| {gpu} | {name} | {s['median']:.1%} | {s['p90']:.1%} | {s['count']} |")
    lines += ["", "| op | median | p90 | rows |", "|---|---|---|---|"]
    for op, s in summary["by_op"].items():
        lines.append(f"| {op} | {s['median']:.1%} | {s['p90']:.1%} | {s['count']} |")
    for node, colls in summary["by_node"].items():
        for coll, parts in colls.items():
            for size, s in parts.items():
                lines.append(f"| {node} {coll} {size} | {s['median']:.1%} | {s['p90']:.1%} | {s['count']} |")
    worst = compute.reindex(compute["rel_error"].abs().sort_values(ascending=False).index).head(10)
    lines += ["", "Worst rows:", "", "| gpu | model | tokens | tp | op | measured | predicted | error |",
              "|---|---|---|---|---|---|---|---|"]
    for row in worst.itertuples():
        lines.append(f"| {row.gpu} | {row.model} | {row.num_tokens} | {row.tp} | {row.op} | "
                     f"{row.measured_s * 1e6:.1f} us | {row.predicted_s * 1e6:.1f} us | "
                     f"{row.rel_error:+.1%} |")
    return "\n".join(lines) + "\n"


def plots(compute: pd.DataFrame, out: Path, mode: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for gpu, part in compute.groupby("gpu"):
        fig, ax = plt.subplots(figsize=(7, 6))
        for op_class, marker in (("gemm", "o"), ("elementwise", "^")):
            sub = part[part["op_class"] == op_class]
            ax.scatter(sub["measured_s"] * 1e3, sub["predicted_s"] * 1e3, s=6, alpha=0.4,
                       marker=marker, label=op_class)
        lo, hi = part["measured_s"].min() * 1e3 / 2, part["measured_s"].max() * 1e3 * 2
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="exact")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured time per op (ms)")
        ax.set_ylabel("predicted time per op (ms)")
        ax.set_title(f"{gpu}: predicted vs measured, {mode}")
        written.append(_save(fig, ax, out / f"vidur_scatter_{gpu}_{mode}.png"))

        fig, ax = plt.subplots(figsize=(8, 5))
        for op_class, sub in part.groupby("op_class"):
            grouped = sub.groupby("num_tokens")["rel_error"].apply(lambda e: e.abs().median())
            ax.plot(grouped.index, grouped.to_numpy() * 100, label=f"{op_class} (median over ops, TP)")
        ax.set_xscale("log")
        ax.set_xlabel("tokens in the step")
        ax.set_ylabel("median absolute error (%)")
        ax.set_title(f"{gpu}: error vs token count, {mode}")
        written.append(_save(fig, ax, out / f"vidur_error_vs_tokens_{gpu}_{mode}.png"))
    return written


def _save(fig: Any, ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- command line -------------------------------------------------------------------------

def _hardware_map(items: Sequence[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        if "=" not in item:
            raise ProfileError(f"--hardware-map takes FOLDER=SPEC, got {item!r}")
        folder, spec = item.split("=", 1)
        mapping[folder] = spec
    return mapping


def run(profiles: Path, mode: str = "shipped", hardware_map: dict[str, str] | None = None,
        ) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    if not profiles.is_dir():
        raise ProfileError(f"{profiles}: no such profiles folder")
    mapping = {**GPU_SPECS, **NODE_SPECS, **(hardware_map or {})}
    compute = read_compute(profiles)
    network = read_network(profiles)
    unknown = sorted({*compute["gpu"], *network["node"]} - mapping.keys())
    if unknown:
        raise ProfileError(
            f"{profiles}: no hardware spec for folder {unknown[0]!r}; "
            f"pass --hardware-map {unknown[0]}=path/to/spec.yaml")
    devices = {gpu: load_device(mapping[gpu]) for gpu in compute["gpu"].unique()}
    systems = {node: load_system(mapping[node]) for node in network["node"].unique()}
    if mode == "datasheet":
        devices = {g: datasheet(d) for g, d in devices.items()}
        systems = {n: datasheet_system(mapping[n]) for n in systems}
    if mode == "lomo":
        compute["predicted_s"] = lomo_compute(compute, devices)
        network["predicted_s"] = holdout_network(network, systems) if not network.empty else []
    else:
        compute["predicted_s"] = predict_compute(compute, lambda g, m: devices[g])
        network["predicted_s"] = predict_network(network, systems.__getitem__) if not network.empty else []
    for frame in (compute, network):
        frame["rel_error"] = frame["predicted_s"] / frame["measured_s"] - 1.0
    return compute, network, summarize(compute, network)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.vidur", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", required=True, type=Path, help="folder with compute/ and network/")
    parser.add_argument("--json", required=True, type=Path, help="report with every row and a summary")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--plots", type=Path, help="folder for the scatter and error-vs-tokens plots")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--datasheet", action="store_true", help="datasheet specs, unfitted efficiencies")
    group.add_argument("--lomo", action="store_true", help="leave-one-model-out fitted efficiencies")
    parser.add_argument("--hardware-map", nargs="*", default=[], metavar="FOLDER=SPEC")
    parser.add_argument("--max-median-error", type=float)
    parser.add_argument("--max-p90-error", type=float)
    args = parser.parse_args(argv)
    mode = "datasheet" if args.datasheet else "lomo" if args.lomo else "shipped"
    try:
        compute, network, summary = run(args.profiles, mode, _hardware_map(args.hardware_map))
    except InferSimError as err:
        print(f"validation.vidur: error: {err}", file=sys.stderr)
        return 2
    compute_rows = compute[["gpu", "model", "num_tokens", "tp", "op", "op_class", "measured_s",
                            "predicted_s", "rel_error"]]
    network_rows = network[["node", "collective", "num_workers", "devices_per_node", "size_bytes",
                            "measured_s", "predicted_s", "rel_error"]].rename(columns={"node": "gpu"})
    report = {"mode": mode, "profiles": str(args.profiles), "summary": summary,
              "rows": compute_rows.to_dict(orient="records") + network_rows.to_dict(orient="records")}
    args.json.write_text(json.dumps(report, indent=1, default=float))
    if args.markdown:
        args.markdown.write_text(markdown(summary, compute, mode))
    if args.plots:
        plots(compute, args.plots, mode)
    for name, s in summary["by_class"].items():
        print(f"{name:>26}: median {s['median']:6.1%}  p90 {s['p90']:6.1%}  ({s['count']} rows)")
    failed = False
    for name, s in summary["by_class"].items():
        if args.max_median_error is not None and s["median"] > args.max_median_error:
            print(f"{name}: median error {s['median']:.1%} exceeds {args.max_median_error:.1%}")
            failed = True
        if args.max_p90_error is not None and s["p90"] > args.max_p90_error:
            print(f"{name}: p90 error {s['p90']:.1%} exceeds {args.max_p90_error:.1%}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
