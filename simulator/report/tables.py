"""Rich tables for the CLI: values formatted with units at the edge."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from simulator.result import EstimateResult
from simulator.specs.units import format_quantity

console = Console()
if not console.is_terminal:  # pipes and CI logs: wide enough that no column is cut
    console = Console(width=160)


def _s(seconds: float) -> str:
    return format_quantity(seconds, "s")


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def print_estimate(result: EstimateResult, ops: bool = False) -> None:
    p = result.precision
    samples = f" x {result.samples} samples" if result.samples > 1 else ""
    title = (f"{result.model} on {result.hardware}: batch {result.batch}{samples}, "
             f"{result.input_len} in / {result.output_len} out, weights {p.weight}, KV {p.kv}")
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row("TTFT", _s(result.ttft_s), f"prefill, {result.prefill.bound}-bound")
    if result.decode:
        table.add_row("TPOT", _s(result.tpot_s), f"mean decode step, {result.decode.bound}-bound")
    if result.kv_transfer_s:
        table.add_row("KV transfer", _s(result.kv_transfer_s), "exposed, prefill pool to decode pool")
    table.add_row("end-to-end", _s(result.e2e_s), "TTFT + (output_len - 1) x TPOT"
                  + (" + KV transfer" if result.kv_transfer_s else ""))
    table.add_row("throughput", f"{result.throughput_tokens_per_s:,.1f} tok/s", "output tokens")
    table.add_row("energy / token", f"{result.energy_j_per_token:.3f} J",
                  f"mean power {result.power_w:.0f} W")
    if result.samples > 1:
        table.add_row("energy / request", f"{result.energy_j_per_request:.1f} J",
                      f"prefill once, {result.samples} samples")
    m = result.memory
    table.add_row("memory", f"{_gb(m.total)} / {_gb(m.capacity)}",
                  f"weights {_gb(m.weights)}, KV {_gb(m.kv_cache)}, activations {_gb(m.activations)}")
    for name, tier in (m.tiers or {}).items():
        parts = ", ".join(f"{k.replace('_', ' ')} {_gb(v)}" for k, v in tier.parts.items() if v)
        table.add_row(f"  on {name}", f"{_gb(tier.used)} / {_gb(tier.capacity)}", parts)
    for phase in (result.prefill, result.decode):
        if phase is not None and phase.transfers_s:
            moved = ", ".join(f"{k.replace('_', ' ')} {_s(v)}" for k, v in phase.transfers_s.items())
            wait = phase.time_s - (phase.compute_s or 0.0)
            table.add_row(f"{phase.phase} transfers", _s(max(wait, 0.0)), f"waiting; {moved}")
    for phase in (result.prefill, result.decode):
        if phase is not None and phase.collectives is not None:
            each = ", ".join(f"{c['count']}x {c['name'].replace('_', ' ')} {_s(c['time_s'])}"
                             for c in phase.collectives)
            exposed = max(0.0, phase.time_s - (phase.compute_s or 0.0))
            table.add_row(f"{phase.phase} communication", _s(phase.communication_s or 0.0),
                          f"{_s(exposed)} exposed (with bubbles); {each or 'none'}")
    for key, value in (result.strategy or {}).items():
        if key == "parallel":
            degrees = ("tp", "pp", "ep", "dp", "micro_batches", "overlap")
            value = ", ".join(f"{k} {value[k]}" for k in degrees) \
                + f"; {value['devices']} devices of {value['device']}; memory per device"
        if key == "disaggregation":
            pre, dec, kv = value["prefill"], value["decode"], value["kv_transfer"]
            value = (f"prefill on {pre['hardware']} ({_gb(pre['memory_bytes']['total'])} per device)"
                     + (f", decode on {dec['hardware']} ({_gb(dec['memory_bytes']['total'])})" if dec else "")
                     + f"; KV {_gb(kv['bytes'])} over {kv['link']} in {_s(kv['time_s'])}, "
                       f"{_s(kv['exposed_s'])} exposed")
        table.add_row("strategy", key.replace("_", " "), str(value))
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    if ops:
        frame = result.ops_frame()
        op_table = Table(title="per-op (decode: mean step)")
        for col in ("phase", "op", "count", "flops", "bytes", "intensity", "time", "share", "bound"):
            op_table.add_column(col, justify="left" if col in ("phase", "op", "bound") else "right")
        for row in frame.itertuples():
            op_table.add_row(row.phase, row.op, str(row.count), f"{row.flops:.3g}",
                             format_quantity(row.bytes, "B"), f"{row.intensity:.1f}",
                             _s(row.time_s), f"{row.share:.1%}", row.bound)
        console.print(op_table)


def print_info(info: dict[str, Any]) -> None:
    table = Table(title=f"{info['name']} ({info['architecture']})")
    table.add_column("field")
    table.add_column("value", justify="right")
    table.add_row("parameters (total)", f"{info['params_total'] / 1e9:.3f} B")
    table.add_row("parameters (active)", f"{info['params_active'] / 1e9:.3f} B")
    table.add_row(f"KV bytes / token ({info['kv_dtype']})", f"{info['kv_bytes_per_token']:,.0f}")
    table.add_row("attention", info["attention_kind"])
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim",
                "vocab_size", "norm", "position_encoding"):
        table.add_row(key, str(info[key]))
    table.add_row("ffn", str(info["ffn"]))
    if info["moe"]:
        table.add_row("moe", str(info["moe"]))
    if info["mla"]:
        table.add_row("mla", str(info["mla"]))
    console.print(table)


def print_list(what: str, rows: list[dict[str, Any]]) -> None:
    table = Table(title=f"shipped {what}")
    if what == "models":
        for col in ("name", "architecture", "params", "active", "layers", "attention", "moe"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["name"], r["architecture"], f"{r['params_total'] / 1e9:.2f} B",
                          f"{r['params_active'] / 1e9:.2f} B", str(r["layers"]), r["attention"],
                          "yes" if r["moe"] else "")
    else:
        for col in ("name", "kind", "devices", "memory", "bandwidth", "16-bit peak"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["name"], r["kind"], str(r["devices"]),
                          format_quantity(r["memory_bytes"], "B"),
                          format_quantity(r["bandwidth_bytes_per_s"], "B/s"),
                          format_quantity(r["peak_16bit_flops"], "FLOPS"))
    console.print(table)
