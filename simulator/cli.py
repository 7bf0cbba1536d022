"""The ``infersim`` command: estimate, plan, info, list, roofline, calibrate, execute,
execute-serve, serve, capacity, sweep, report, validate.

Every user error (bad spec, unknown name, plan that does not fit) prints one
line on stderr and exits with code 2; ``--json`` prints machine-readable
output on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from simulator import dtypes
from simulator.errors import InferSimError

DEFAULT_MODEL = "llama-2-7b"
DEFAULT_HARDWARE = "a100-80gb-sxm"


def _add_model_hardware(parser: argparse.ArgumentParser, hardware: bool = True) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"shipped model name, or a YAML/config.json path (default {DEFAULT_MODEL})")
    if hardware:
        parser.add_argument("--hardware", default=DEFAULT_HARDWARE,
                            help="shipped device or system name, or a YAML path "
                                 f"(default {DEFAULT_HARDWARE})")


def _add_shape(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--output-len", type=int, default=128, help="generated tokens (default 128)")
    parser.add_argument("--samples", type=int, default=1, metavar="N",
                        help="parallel samples per prompt sharing its KV cache: best-of-N, self-consistency "
                             "(default 1)")
    parser.add_argument("--weight-dtype", default="bf16", choices=dtypes.WEIGHT_DTYPES)
    parser.add_argument("--weight-dequant", default="fused", choices=("fused", "separate"),
                        help="integer weights dequantized inside the GEMM (fused, default) or by a kernel "
                             "of their own before it (separate: FlexGen, eager frameworks)")
    parser.add_argument("--kv-dtype", default=None, choices=dtypes.KV_DTYPES,
                        help="KV-cache dtype (default: the activation dtype)")
    parser.add_argument("--act-dtype", default="bf16", choices=dtypes.ACT_DTYPES)
    parser.add_argument("--attention", default="flash", choices=("flash", "naive"),
                        help="attention memory traffic: FlashAttention-style or materialised scores")
    parser.add_argument("--group-size", type=int, default=dtypes.DEFAULT_GROUP_SIZE,
                        help="quantization group size of integer dtypes (default 128)")


def _add_strategy(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory-hierarchy strategies")
    group.add_argument("--offload-weights", metavar="TIER=F,...",
                       help="fraction of every layer's weights on host/disk, e.g. host=0.5,disk=0.2 "
                            "(the device keeps the rest)")
    group.add_argument("--layers-on-device", type=int, metavar="N",
                       help="llama.cpp-style split: the first N layers on the device, the rest on the host")
    group.add_argument("--offload-kv", metavar="host=F", help="fraction of the KV cache in host memory")
    group.add_argument("--no-prefetch", action="store_true",
                       help="do not overlap the next layer's transfers with this layer's compute")
    group.add_argument("--host-compute", action="store_true",
                       help="run the layers whose weights are off the device on the host CPU instead "
                            "of moving them (CPU-GPU hybrid)")
    group.add_argument("--expert-cache", type=float, metavar="F",
                       help="MoE: fraction of each layer's experts held on the device (the rest on the host)")
    group.add_argument("--routing-skew", type=float, default=0.0,
                       help="MoE: Zipf exponent of expert popularity (default 0, uniform)")
    group.add_argument("--expert-prefetch", type=float, default=0.0, metavar="A",
                       help="MoE: share of missed experts predicted and fetched a layer ahead (default 0)")
    group.add_argument("--experts-on-host", action="store_true",
                       help="MoE: compute missed experts on the host CPU instead of fetching them")
    _add_kv_flags(group)
    spec = parser.add_argument_group("speculative decoding")
    spec.add_argument("--draft-model",
                      help="draft model (name or path), or 'self' to draft with the target over a "
                           "sparse KV cache (--draft-kv-budget); turns speculative decoding on")
    spec.add_argument("--draft-kv-budget", type=int, metavar="TOKENS",
                      help="the draft keeps only this many recent tokens of KV cache")
    spec.add_argument("--spec-gamma", type=int, default=4, help="tokens drafted per round (default 4)")
    spec.add_argument("--spec-alpha", type=float, default=0.8,
                      help="probability a drafted token is accepted (default 0.8)")
    spec.add_argument("--spec-profile", metavar="A1,A2,...",
                      help="per-position acceptance instead of --spec-alpha, one per drafted token")
    spec.add_argument("--draft-hardware", help="run the draft on another device or system")
    fl = parser.add_argument_group("flash-backed FFN weights (LLM in a flash)")
    fl.add_argument("--flash-active", type=float, metavar="A",
                    help="FFN weights on the drive, reading only the neurons a token activates (share A, "
                         "e.g. 0.05); turns it on")
    fl.add_argument("--flash-window", type=int, default=5,
                    help="steps whose neurons stay in memory (default 5)")
    fl.add_argument("--flash-reuse", type=float,
                    help="share of a step's active neurons already in memory (default: from the window)")
    fl.add_argument("--flash-queue-depth", type=int, default=32, help="reads in flight (default 32)")
    par = parser.add_argument_group("parallelism (over the devices of a system, e.g. --hardware dgx-h100)")
    par.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    par.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    par.add_argument("--ep", type=int, default=1, help="expert-parallel degree, a multiple of --tp")
    par.add_argument("--dp", type=int, default=1, help="data-parallel replicas; --batch is their total")
    par.add_argument("--micro-batches", type=int, help="pipeline micro-batches per step (default: --pp)")
    par.add_argument("--overlap", default="none",
                     help="communication hidden under compute: none (default), partial, full, or 0..1")
    par.add_argument("--sequence-parallel", action="store_true",
                     help="reduce-scatter + all-gather instead of all-reduce; norms on 1/tp of the tokens")
    par.add_argument("--pp-schedule", default="interleaved", choices=("interleaved", "gpipe"),
                     help="pipeline decode: micro-batches as independent streams (default), or drain "
                          "the pipeline every step")
    par.add_argument("--expert-imbalance", type=float,
                     help="busiest expert-parallel device's load over the mean (default: random routing)")
    dis = parser.add_argument_group("prefill/decode disaggregation")
    dis.add_argument("--prefill-hardware", help="run prefill on this pool (default --hardware)")
    dis.add_argument("--decode-hardware", help="run decode on this pool (default --hardware)")
    dis.add_argument("--kv-link", help="link the KV cache crosses: inter_node (default), intra_node, "
                                       "host_device, or a bandwidth such as '50 GB/s'")


def _add_kv_flags(group: Any) -> None:
    """KV eviction and compression flags, shared by ``estimate`` and ``plan``."""
    group.add_argument("--kv-policy", default="full", choices=("full", "window", "streaming", "h2o"),
                       help="KV eviction: keep a budget of recent tokens, sinks + window, or heavy hitters")
    group.add_argument("--kv-budget", type=float,
                       help="tokens kept per sequence (> 1) or a fraction of the sequence (<= 1)")
    group.add_argument("--kv-sinks", type=int, default=4,
                       help="attention sinks kept by --kv-policy streaming (default 4)")
    group.add_argument("--kv-store", default="kv", choices=("kv", "x"),
                       help="x: XQuant, cache each layer's input and recompute K and V per decode step")
    group.add_argument("--kv-residual", type=int, default=0,
                       help="KIVI: recent tokens kept in the activation dtype beside a quantized --kv-dtype")


def _kv_options(args: argparse.Namespace) -> dict[str, Any]:
    """``estimate`` keyword arguments for the KV flags."""
    from simulator.strategies.kv import KVPolicy

    return {"kv_residual": args.kv_residual, "kv_store": args.kv_store,
            "kv_policy": KVPolicy.chosen(args.kv_policy, args.kv_budget, args.kv_sinks),
            "weight_dequant": getattr(args, "weight_dequant", "fused")}


def strategy_options(args: argparse.Namespace) -> dict[str, Any]:
    """``estimate`` keyword arguments for the strategy flags."""
    from simulator.specs.loader import load_model
    from simulator.strategies.offload import OffloadPlan

    options = _kv_options(args)
    if args.draft_model:
        from simulator.strategies.speculative import Speculation, parse_profile

        options["speculative"] = Speculation(args.draft_model, args.spec_gamma, args.spec_alpha,
                                             parse_profile(args.spec_profile), args.draft_hardware,
                                             args.draft_kv_budget)
    elif args.spec_profile or args.draft_hardware or args.draft_kv_budget:
        raise InferSimError("--spec-profile, --draft-hardware and --draft-kv-budget need --draft-model")
    if (args.tp, args.pp, args.ep, args.dp, args.micro_batches) != (1, 1, 1, 1, None) \
            or args.sequence_parallel or args.overlap != "none" or args.expert_imbalance is not None \
            or args.pp_schedule != "interleaved":
        from simulator.strategies.parallel import ParallelPlan

        options["parallel"] = ParallelPlan(
            tp=args.tp, pp=args.pp, ep=args.ep, dp=args.dp, micro_batches=args.micro_batches,
            overlap=args.overlap, sequence_parallel=args.sequence_parallel,
            expert_imbalance=args.expert_imbalance, schedule=args.pp_schedule)
    options.update(prefill_hardware=args.prefill_hardware, decode_hardware=args.decode_hardware,
                   kv_link=args.kv_link)
    if args.flash_active is not None:
        from simulator.strategies.flash import FlashPlan

        options["flash"] = FlashPlan(active=args.flash_active, window=args.flash_window,
                                     reuse=args.flash_reuse, queue_depth=args.flash_queue_depth)
    if (args.offload_weights or args.offload_kv or args.layers_on_device is not None
            or args.host_compute or args.no_prefetch or args.expert_cache is not None):
        options["offload"] = OffloadPlan.build(
            load_model(args.model), weights=args.offload_weights, kv=args.offload_kv,
            prefetch=not args.no_prefetch, host_compute=args.host_compute,
            layers_on_device=args.layers_on_device, expert_cache=args.expert_cache,
            routing_skew=args.routing_skew, expert_prefetch=args.expert_prefetch,
            experts_on_host=args.experts_on_host)
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infersim",
        description="Predict LLM inference latency, throughput, memory and energy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    est = sub.add_parser("estimate", help="latency, throughput, memory and energy of one request shape")
    _add_model_hardware(est)
    _add_shape(est)
    _add_strategy(est)
    est.add_argument("--ops", action="store_true", help="also print the per-op table")
    est.add_argument("--json", action="store_true", help="print JSON instead of tables")

    plan = sub.add_parser("plan", help="search weight/KV placement (and batch) over device, host and disk")
    _add_model_hardware(plan)
    plan.set_defaults(hardware="workstation-4090")
    plan.add_argument("--batch", type=int,
                      help="fix the batch (default: searched for throughput, 1 for latency)")
    plan.add_argument("--max-batch", type=int, default=1024, help="largest batch searched (default 1024)")
    plan.add_argument("--input-len", type=int, default=512, help="prompt tokens (default 512)")
    plan.add_argument("--output-len", type=int, default=128, help="generated tokens (default 128)")
    plan.add_argument("--weight-dtype", default="bf16", choices=dtypes.WEIGHT_DTYPES)
    plan.add_argument("--kv-dtype", default=None, choices=dtypes.KV_DTYPES)
    plan.add_argument("--weight-dequant", default="fused", choices=("fused", "separate"),
                      help="integer weights dequantized inside the GEMM (default) or by a kernel of "
                           "their own (FlexGen)")
    plan.add_argument("--attention", default="flash", choices=("flash", "naive"),
                      help="fused attention (default) or eager, reading a quantized cache dequantized")
    _add_kv_flags(plan.add_argument_group("KV cache (applied to every plan searched)"))
    plan.add_argument("--objective", default="throughput", choices=("throughput", "latency"))
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")

    run = sub.add_parser("run", help="estimate a scenario YAML (model, hardware, workload, strategy)")
    run.add_argument("scenario", help="scenario file; see workloads/scenarios/ and simulator/scenario.py")
    run.add_argument("--ops", action="store_true", help="also print the per-op table")
    run.add_argument("--json", action="store_true", help="print JSON instead of tables")

    info = sub.add_parser("info", help="parameter counts, KV bytes per token and shape of a model")
    _add_model_hardware(info, hardware=False)
    info.add_argument("--kv-dtype", default="bf16", choices=dtypes.KV_DTYPES)
    info.add_argument("--json", action="store_true")

    lst = sub.add_parser("list", help="shipped models or hardware")
    lst.add_argument("what", choices=("models", "hardware"))
    lst.add_argument("--json", action="store_true")

    cal = sub.add_parser("calibrate", help="fit this host's CPU as a device from microbenchmarks")
    cal.add_argument("--out", required=True,
                     help="hardware YAML to write, e.g. hardware_specs/local/NAME.yaml")
    cal.add_argument("--name", help="device name (default: the file name)")
    cal.add_argument("--quick", action="store_true", help="fewer sizes and shorter timings (~1 min)")
    cal.add_argument("--only", choices=("workers", "dequantize", "disk", "refit"),
                     help="on an existing --out file: workers re-measures only what parallel worker "
                          "processes see (shared memory, the executor's collectives, GEMMs in a "
                          "worker); dequantize only the KV dequantization kernels; disk only the "
                          "per-file reads (latency and rate of a layer's or an expert's file); refit "
                          "fits the recorded microbenchmarks again without measuring")

    from validation.executor.cli import add_execute_parser, add_serve_parser

    add_execute_parser(sub)
    add_serve_parser(sub)
    from simulator.engine.cli import add_serve_parser as add_engine_serve_parser

    add_engine_serve_parser(sub, _add_model_hardware)
    from simulator.study.cli import add_sweep_parser
    from simulator.study.report_cli import add_report_parser

    add_sweep_parser(sub)
    add_report_parser(sub)
    from simulator.study.plan_search_cli import add_plan_search_parser

    add_plan_search_parser(sub)

    val = sub.add_parser("validate", help="predict measured executor runs and report the error")
    val.add_argument("--measurements", required=True, help="CSV written by python -m validation.measure")
    val.add_argument("--hardware", required=True, help="hardware spec of the machine that measured")
    val.add_argument("--max-median-error", type=float, help="exit 1 when a median |error| exceeds this")
    val.add_argument("--max-p90-error", type=float, help="exit 1 when a p90 |error| exceeds this")
    val.add_argument("--report", help="also write a markdown report here")

    roof = sub.add_parser("roofline", help="plot the device roofline with every op of the estimate")
    _add_model_hardware(roof)
    _add_shape(roof)
    roof.add_argument("--out", default="roofline.png", help="output image (default roofline.png)")
    return parser


def _estimate(args: argparse.Namespace):
    from simulator.estimate import estimate

    return estimate(
        args.model, args.hardware, batch=args.batch, input_len=args.input_len,
        output_len=args.output_len, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype,
        act_dtype=args.act_dtype, attention=args.attention, group_size=args.group_size, samples=args.samples,
        **(strategy_options(args) if hasattr(args, "offload_weights") else {}),
    )


def _print_result(result: Any, args: argparse.Namespace) -> int:
    """An estimate as JSON (``--json``) or as tables (``--ops`` adds the per-op table)."""
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    from simulator.report.tables import print_estimate

    print_estimate(result, ops=args.ops)
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    return _print_result(_estimate(args), args)


def cmd_run(args: argparse.Namespace) -> int:
    from simulator.scenario import load_scenario, run_scenario, serve_scenario

    scenario = load_scenario(args.scenario)
    if scenario.serving is not None:
        from simulator.engine.cli import print_summary

        _, summary = serve_scenario(args.scenario)
        return print_summary(summary, args.json, f"{scenario.model} on {scenario.hardware}",
                             scenario.serving.scheduler)
    return _print_result(run_scenario(args.scenario), args)


def cmd_plan(args: argparse.Namespace) -> int:
    from simulator.strategies.plan import search

    choice = search(args.model, args.hardware, input_len=args.input_len, output_len=args.output_len,
                    objective=args.objective, batch=args.batch, max_batch=args.max_batch,
                    weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype, attention=args.attention,
                    **_kv_options(args))
    if args.json:
        print(json.dumps(choice.to_dict(), indent=2))
        return 0
    from simulator.report.tables import console, print_estimate

    w = choice.plan.to_dict()["weights"]
    console.print(f"[bold]plan ({choice.objective}, {choice.candidates} batch sizes searched):[/bold] "
                  f"batch {choice.batch}; weights device {w['device']:.1%}, host {w['host']:.1%}, "
                  f"disk {w['disk']:.1%}; KV on host {choice.plan.kv_host:.1%}")
    console.print(f"binding: {', '.join(choice.binding) or 'nothing (everything fits with room)'}")
    print_estimate(choice.result)
    return 0


def model_info(model_name: str, kv_dtype: str) -> dict[str, Any]:
    from simulator.graph.transformer import kv_bytes_per_token
    from simulator.specs.loader import load_model

    model = load_model(model_name)
    return {
        "params_total": model.params(),
        "params_active": model.params(active=True),
        "kv_bytes_per_token": kv_bytes_per_token(model, kv_dtype),
        "kv_dtype": kv_dtype,
        "attention_kind": model.attention_kind,
        **model.model_dump(),
    }


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(args.model, args.kv_dtype)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from simulator.report.tables import print_info

    print_info(info)
    return 0


def list_rows(what: str) -> list[dict[str, Any]]:
    from simulator.specs import loader

    rows = []
    if what == "models":
        for name in loader.shipped_models():
            model = loader.load_model(name)
            rows.append({
                "name": name, "architecture": model.architecture,
                "params_total": model.params(), "params_active": model.params(active=True),
                "layers": model.num_layers, "hidden": model.hidden_size,
                "attention": model.attention_kind, "moe": model.is_moe,
            })
        return rows
    for kind, names in (("device", loader.shipped_devices()), ("system", loader.shipped_systems())):
        for name in names:
            system = loader.load_system(name)
            device = system.device
            peak = max(device.compute.get(d, 0.0) for d in ("bf16", "fp16", "fp32"))
            rows.append({
                "name": name, "kind": kind, "device": device.name,
                "devices": system.num_devices,
                "memory_bytes": device.main_memory.capacity,
                "bandwidth_bytes_per_s": device.main_memory.bandwidth,
                "peak_16bit_flops": peak,
            })
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    rows = list_rows(args.what)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from simulator.report.tables import print_list

    print_list(args.what, rows)
    return 0


def cmd_roofline(args: argparse.Namespace) -> int:
    from simulator.report.roofline_plot import plot_roofline
    from simulator.specs.loader import load_system

    result = _estimate(args)
    path = plot_roofline(result, load_system(args.hardware).device, args.out)
    print(f"wrote {path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from simulator.calibrate.host import main_calibrate

    if args.only == "workers":
        from simulator.calibrate.host import update_shared

        return update_shared(Path(args.out), args.quick)
    if args.only == "dequantize":
        from simulator.calibrate.host import update_dequantize

        return update_dequantize(Path(args.out), args.quick)
    if args.only == "disk":
        from simulator.calibrate.host import update_disk

        return update_disk(Path(args.out), args.quick)
    if args.only == "refit":
        from simulator.calibrate.host import refit

        return refit(Path(args.out))
    return main_calibrate(Path(args.out), args.quick, args.name)


def _elsewhere(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command implemented in ``module``, imported when it runs (the heavy imports stay out
    of start-up)."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    return run


def cmd_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from validation.compare import validate

    return validate(Path(args.measurements), args.hardware, args.max_median_error, args.max_p90_error,
                    Path(args.report) if args.report else None)


COMMANDS = {"estimate": cmd_estimate, "run": cmd_run, "plan": cmd_plan, "info": cmd_info, "list": cmd_list,
            "roofline": cmd_roofline, "calibrate": cmd_calibrate,
            "execute": _elsewhere("validation.executor.cli", "cmd_execute"),
            "execute-serve": _elsewhere("validation.executor.cli", "cmd_execute_serve"),
            "serve": _elsewhere("simulator.engine.cli", "cmd_serve"),
            "capacity": _elsewhere("simulator.engine.cli", "cmd_capacity"),
            "sweep": _elsewhere("simulator.study.cli", "cmd_sweep"),
            "report": _elsewhere("simulator.study.report_cli", "cmd_report"),
            "plan-search": _elsewhere("simulator.study.plan_search_cli", "cmd_plan_search"),
            "validate": cmd_validate}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except InferSimError as err:
        print(f"infersim: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
