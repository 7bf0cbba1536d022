"""Vidur beside InferSim: the same requests on the same hardware under the same scheduler limits.

    python -m docs.bench_vidur --vidur-python /tmp/vidur-venv/bin/python --vidur-data DIR
        [--requests 10000] [--time-scale 1] [--vidur-grid default|quick] [--attention-samples CSV]
        [--work DIR]                                                     (from the repository root)

Vidur (microsoft/vidur, the PyPI package ``vidur``) predicts each operator's time with random
forests trained on measured GPU profiles; its first run trains them (a grid search with 10-fold
cross-validation per operator) and caches them, later runs reuse the cache. This script runs, on
the first ``--requests`` of the Azure conversation trace (lengths clipped to Llama-2-7B's 4,096
tokens the way Vidur's trace loader clips them: the prompt gives way):

1. Vidur with an empty predictor cache (training, then the simulation), wall-clocked;
2. Vidur again with the cache it just filled;
3. ``infersim serve`` on the same requests;

and prints a markdown table of wall time, TTFT/TBT/end-to-end percentiles and throughput. Vidur's
own grid search (``--vidur-grid default``: 27 forests x 10 folds per operator) takes hours on two
cores; ``--vidur-grid quick`` trains one forest per operator with 2 folds. Vidur runs with one fix
(``PATCHED_MAIN``): without it, 0.0.26 stops at its first recompute preemption.

Setup (Vidur is not a dependency of InferSim and not part of the tests)::

    python -m venv /tmp/vidur-venv && /tmp/vidur-venv/bin/pip install vidur==0.0.26
    git -C <vidur clone> archive HEAD data | tar -x -C DIR     # its data/ folder: the profiles

Vidur 0.0.26 downloads its profiles from Hugging Face datasets; here they are laid out as a local
Hugging Face cache (``HF_HUB_OFFLINE=1``) built from ``DIR``'s A100 profiles of Llama-2-7B:
``data/profiling/compute/a100/meta-llama/Llama-2-7b-hf/{mlp,attention}.csv`` and
``data/profiling/network/a100_dgx/{all_reduce,send_recv}.csv`` (unused at TP 1, but Vidur loads
them). Where ``attention.csv`` is missing (copies of the repository that leave out files over
4 MiB lack it), ``--attention-samples`` names a CSV of rows transcribed from it
(``kind,batch_size,prefill_chunk_size,kv_cache_size,median_ms``) from which the attention profile
is rebuilt on Vidur's profiling grid (``attention_from_samples``); the table then says so.

Matched settings: Llama-2-7B, one A100-80GB, TP 1, one replica; vLLM-style scheduling (whole
prompts first, prefill-only or decode-only iterations) with at most 128 sequences and 4,096 new
tokens per iteration; 16-token KV blocks, the same number of blocks (InferSim's KV capacity at
``--memory-fraction 0.9``, passed to Vidur as ``--cache_config_num_blocks``), a 1 % watermark,
recompute preemption; no CPU overhead per iteration (Vidur 0.0.26 models none).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

from docs.bench_estimate import cpu_model
from simulator.engine.scheduler import SchedulerConfig
from simulator.engine.serve import replica_memory
from simulator.engine.workload import Workload, clip_lengths, read_trace
from simulator.estimate import resolve_precision
from simulator.specs.loader import load_model, load_system

TRACE = "../shared/traces/azure-llm-inference-2023/splitwise_conv.csv"
MODEL, HARDWARE = "llama-2-7b", "a100-80gb-sxm"
VIDUR_MODEL, VIDUR_DEVICE, VIDUR_NODE = "meta-llama/Llama-2-7b-hf", "a100", "a100_dgx"
MAX_TOKENS = 4096  # Llama-2's context; Vidur's trace loader trims prompts to fit it
SCHEDULER = SchedulerConfig(policy="continuous", max_batch=128, max_batch_tokens=4096, block_size=16,
                            preemption="recompute", prefix_caching=False)
MEMORY_FRACTION = 0.9
COMPUTE_DATASET, NETWORK_DATASET = "local/vidur-a100-llama-2-7b-hf", "local/vidur-a100-dgx"
PROFILE_DIR = Path("data/profiling/compute") / VIDUR_DEVICE / VIDUR_MODEL
NETWORK_DIR = Path("data/profiling/network") / VIDUR_NODE
SNAPSHOT = "0" * 40  # the local cache's one revision
GRIDS = {  # Vidur's random-forest grid search: (trees, depth, min split), cross-validation folds
    "default": None,  # Vidur's own: trees 250/500/750 x depth 8/16/32 x split 2/5/10, 10 folds
    "quick": ((250,), (32,), (2,), 2),  # one forest per operator, 2 folds (3 fits instead of 271)
}

# Vidur 0.0.26's ``Request.restart`` (recompute preemption) resets the request's processed-token
# count but not its per-stage count, so the restarted prefill trips ``assert
# self._num_stage_processed_tokens <= self.total_tokens`` at the first preemption; reset both.
PATCHED_MAIN = """
import runpy
from vidur.entities.request import Request
_restart = Request.restart
def restart(self):
    _restart(self)
    self._num_stage_processed_tokens = 0
    self._is_prefill_stage_complete = False
Request.restart = restart
runpy.run_module("vidur.main", run_name="__main__")
"""


def fail(message: str) -> NoReturn:
    raise SystemExit(f"bench_vidur: {message}")


def check_vidur(python: str) -> str:
    """Vidur's version in ``python``'s environment, or a clear failure."""
    probe = ("import sklearn, huggingface_hub, vidur.main; from importlib.metadata import version; "
             "print(version('vidur'))")
    try:
        out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except OSError as exc:
        fail(f"--vidur-python {python}: cannot run it ({exc}); create a venv and "
             "`pip install vidur==0.0.26` into it")
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        fail(f"--vidur-python {python} cannot import vidur ({last}); `{python} -m pip install vidur==0.0.26`")
    return out.stdout.strip()


def profile_files(data_dir: Path, samples: Path | None) -> dict[str, Path | None]:
    """The profile CSVs under Vidur's ``data/`` folder (``data_dir`` is it or its parent)."""
    root = data_dir.parent if data_dir.name == "data" else data_dir
    files: dict[str, Path | None] = {
        "mlp": root / PROFILE_DIR / "mlp.csv", "attention": root / PROFILE_DIR / "attention.csv",
        "all_reduce": root / NETWORK_DIR / "all_reduce.csv",
        "send_recv": root / NETWORK_DIR / "send_recv.csv"}
    for name in ("mlp", "all_reduce", "send_recv"):
        if not files[name].is_file():
            fail(f"--vidur-data {data_dir}: no {files[name]}; extract the Vidur repository's data/ "
                 "folder there (`git archive HEAD data | tar -x -C DIR`)")
    if not files["attention"].is_file():
        if samples is None:
            fail(f"--vidur-data {data_dir}: no {files['attention']} (copies that leave out files over "
                 "4 MiB lack it); get the full file, or pass --attention-samples CSV")
        if not samples.is_file():
            fail(f"--attention-samples {samples}: no such file")
        files["attention"] = None
    return files


def attention_from_samples(samples: pd.DataFrame) -> pd.DataFrame:
    """Vidur's A100 attention profile (TP 1, 16-token blocks) rebuilt from transcribed rows.

    Decode, per layer, from full batch sweeps (batch 1 or 2 up to 64 or more, at one KV length
    each): a sweep is read piecewise linearly in the batch size (beyond its last batch, along the
    line through its upper half), sweeps are interpolated linearly in the KV length, and past the
    longest sweep ``t = sweep(batch) + g * batch * (kv - kv_sweep)``, ``g`` (time per cached token
    read) fitted to the longer rows. Prefill: ``t = c0 + c1 n + c2 n^2 + c3 n kv + c4 kv`` for a
    chunk of ``n`` new tokens after ``kv`` cached ones, least squares in relative error. Both are
    evaluated on Vidur's profiling grid (batch 1..128; KV lengths 32..1024 by 32 and 1,088..4,032
    by 64; chunks 64..128 by 16, 160..1,024 by 32 and 1,088..4,096 by 64), so the table has the
    rows Vidur trains on, without the measurement noise of the original.
    """
    need = {"kind", "batch_size", "prefill_chunk_size", "kv_cache_size", "median_ms"}
    if not need <= set(samples.columns):
        fail(f"--attention-samples: needs columns {sorted(need)}, has {sorted(samples.columns)}")
    decode, prefill = samples[samples.kind == "decode"], samples[samples.kind == "prefill"]
    sweeps = {kv: g.sort_values("batch_size") for kv, g in decode.groupby("kv_cache_size")
              if g.batch_size.min() <= 2 and g.batch_size.max() >= 64}
    if not sweeps or len(prefill) < 5:
        fail("--attention-samples: needs a decode batch sweep (batch 1 or 2 up to 64 or more) and five "
             "or more prefill rows")

    def sweep(kv: int, batch: np.ndarray) -> np.ndarray:
        g = sweeps[kv]
        upper = g[g.batch_size >= g.batch_size.max() / 2]
        slope, intercept = np.polyfit(upper.batch_size, upper.median_ms, 1)
        inside = np.interp(batch, g.batch_size, g.median_ms)
        return np.where(batch > g.batch_size.max(), intercept + slope * batch, inside)

    swept = sorted(sweeps)
    longest = swept[-1]
    beyond = decode[decode.kv_cache_size > longest]
    reads = (beyond.batch_size * (beyond.kv_cache_size - longest)).to_numpy(float)
    excess = beyond.median_ms.to_numpy() - sweep(longest, beyond.batch_size.to_numpy(float))
    per_token = float(reads @ excess / (reads @ reads)) if len(beyond) else 0.0

    def decode_ms(kv: int, batch: np.ndarray) -> np.ndarray:
        if kv >= longest:
            return sweep(longest, batch) + per_token * batch * (kv - longest)
        if kv <= swept[0]:
            return sweep(swept[0], batch)
        hi = next(k for k in swept if k >= kv)
        lo = max(k for k in swept if k < kv)
        w = (kv - lo) / (hi - lo)
        return (1 - w) * sweep(lo, batch) + w * sweep(hi, batch)

    n, kv = prefill.prefill_chunk_size.to_numpy(float), prefill.kv_cache_size.to_numpy(float)
    features = np.c_[np.ones_like(n), n, n * n, n * kv, kv]
    coef, *_ = np.linalg.lstsq(features / prefill.median_ms.to_numpy()[:, None], np.ones(len(n)), rcond=None)

    kv_grid = list(range(32, 1025, 32)) + list(range(1088, MAX_TOKENS, 64))
    chunks = sorted(set(range(64, 129, 16)) | set(range(160, 1025, 32))
                    | set(range(1088, MAX_TOKENS + 1, 64)))
    rows = []
    batches = np.arange(1, 129, dtype=float)
    for k in kv_grid:
        times = decode_ms(k, batches)
        rows += [(0, k, int(b), max(t, 1e-3), np.nan) for b, t in zip(batches, times, strict=True)]
    for c in chunks:
        for k in [0] + [k for k in kv_grid if c + k <= MAX_TOKENS]:
            t = coef @ np.array([1.0, c, c * c, c * k, k])
            rows.append((c, k, 1, np.nan, max(t, 1e-3)))
    table = pd.DataFrame(rows, columns=["prefill_chunk_size", "kv_cache_size", "batch_size",
                                        "time_stats.attn_decode.median", "time_stats.attn_prefill.median"])
    table["is_prefill"] = table.prefill_chunk_size > 0
    for column, value in (("n_embd", 4096), ("n_q_head", 32), ("n_kv_head", 32), ("block_size", 16),
                          ("num_tensor_parallel_workers", 1), ("max_model_len", MAX_TOKENS)):
        table[column] = value
    return table


def write_hf_dataset(cache: Path, repo_id: str, files: dict[str, pd.DataFrame | Path], config: dict) -> None:
    """A dataset in Hugging Face's cache layout, which ``snapshot_download`` finds offline."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    (snapshot / "config.json").write_text(json.dumps(config))
    for name, source in files.items():
        text = source.to_csv(index=False) if isinstance(source, pd.DataFrame) else Path(source).read_text()
        (snapshot / f"{name}.csv.xz").write_bytes(lzma.compress(text.encode()))


def write_profiles(cache: Path, files: dict[str, Path | None], samples: Path | None) -> None:
    attention = files["attention"] or attention_from_samples(pd.read_csv(samples))
    write_hf_dataset(cache / "profiling_data" / "compute", COMPUTE_DATASET,
                     {"mlp": files["mlp"], "attention": attention},
                     {"model": VIDUR_MODEL, "device_sku": VIDUR_DEVICE})
    write_hf_dataset(cache / "profiling_data" / "network", NETWORK_DATASET,
                     {"all_reduce": files["all_reduce"], "send_recv": files["send_recv"]},
                     {"sku": VIDUR_NODE})


def write_traces(workload: Workload, work: Path) -> tuple[Path, Path]:
    """The same requests as InferSim's trace CSV and as Vidur's trace-replay CSV."""
    ours, theirs = work / "requests.csv", work / "requests_vidur.csv"
    frame = pd.DataFrame({"arrived_at": workload.arrival_s, "num_prefill_tokens": workload.prompt_tokens,
                          "num_decode_tokens": workload.output_tokens})
    frame.to_csv(ours, index=False)
    frame.rename(columns={"arrived_at": "Time", "num_prefill_tokens": "PromptTokenCount",
                          "num_decode_tokens": "CompletionTokenCount"}).assign(Date="2023-08-21").to_csv(
        theirs, index=False)
    return ours, theirs


def kv_blocks() -> int:
    """InferSim's KV blocks for the replica (``serve``'s sizing), which Vidur is given too."""
    model, system = load_model(MODEL), load_system(HARDWARE)
    precision = resolve_precision(system.device, "bf16", None, "bf16", 128)
    memory = replica_memory(model, system, precision, None, SCHEDULER.max_batch_tokens, MEMORY_FRACTION)
    return memory.kv_tokens // SCHEDULER.block_size


def vidur_command(python: str, trace: Path, blocks: int, cache: Path, out: Path, grid: str) -> list[str]:
    rf = "--random_forrest_execution_time_predictor_config_"
    trace_cfg = "--trace_request_generator_config_"
    flags = {
        "--seed": 42, "--replica_config_model_name": VIDUR_MODEL, "--replica_config_device": VIDUR_DEVICE,
        "--replica_config_network_device": VIDUR_NODE, "--replica_config_tensor_parallel_size": 1,
        "--replica_config_num_pipeline_stages": 1, "--cluster_config_num_replicas": 1,
        "--replica_scheduler_config_type": "vllm",
        "--vllm_scheduler_config_batch_size_cap": SCHEDULER.max_batch,
        "--vllm_scheduler_config_max_tokens_in_batch": SCHEDULER.max_batch_tokens,
        "--cache_config_block_size": SCHEDULER.block_size, "--cache_config_num_blocks": blocks,
        "--cache_config_watermark_blocks_fraction": SCHEDULER.watermark,
        "--request_generator_config_type": "trace_replay", f"{trace_cfg}trace_file": trace,
        f"{trace_cfg}max_tokens": MAX_TOKENS, f"{trace_cfg}prefill_scale_factor": 1,
        f"{trace_cfg}decode_scale_factor": 1, f"{trace_cfg}time_scale_factor": 1,
        "--execution_time_predictor_config_type": "random_forrest",
        f"{rf}model_profiling_dataset": COMPUTE_DATASET, f"{rf}network_profiling_dataset": NETWORK_DATASET,
        f"{rf}cache_dir": cache, f"{rf}prediction_max_prefill_chunk_size": MAX_TOKENS,
        f"{rf}prediction_max_batch_size": SCHEDULER.max_batch,
        f"{rf}prediction_max_tokens_per_request": MAX_TOKENS,
        "--metrics_config_output_dir": out,
    }
    if GRIDS[grid] is not None:
        trees, depth, split, folds = GRIDS[grid]
        flags.update({f"{rf}num_estimators": trees, f"{rf}max_depth": depth, f"{rf}min_samples_split": split,
                      f"{rf}k_fold_cv_splits": folds})
    switches = ["--no-metrics_config_enable_chrome_trace", "--no-metrics_config_store_plots",
                "--metrics_config_store_token_completion_metrics"]
    command = [python, "-c", PATCHED_MAIN]
    for name, value in flags.items():
        command += [name] + [str(v) for v in (value if isinstance(value, tuple) else (value,))]
    return command + switches


def run_vidur(command: list[str], work: Path, log: Path) -> tuple[float, Path]:
    """Wall seconds of one Vidur run and its output folder."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", HF_HUB_DISABLE_TELEMETRY="1")
    out = Path(command[command.index("--metrics_config_output_dir") + 1])
    before = set(out.glob("*")) if out.exists() else set()
    start = time.perf_counter()
    with open(log, "w") as sink:
        # Its own session, so that an interrupt also ends the training workers it starts.
        process = subprocess.Popen(command, cwd=work, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait()
        except BaseException:
            os.killpg(process.pid, signal.SIGTERM)
            raise
    wall = time.perf_counter() - start
    if process.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        fail(f"Vidur exited with {process.returncode} ({tail[0]}); its log: {log}")
    runs = sorted(set(out.glob("*")) - before)
    if not runs:
        fail(f"Vidur wrote no output under {out}; its log: {log}")
    return wall, runs[-1]


def log_phases(log: Path) -> tuple[float, float]:
    """Seconds from Vidur's first log line to the start of its event loop (predictor training or
    loading included), and of the event loop itself; its log stamps whole seconds."""
    stamps = {}
    for line in log.read_text().splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) < 4 or parts[0] not in ("INFO", "ERROR", "WARNING"):
            continue
        try:
            at = datetime.strptime(f"{parts[1]} {parts[2]}", "%m-%d %H:%M:%S")
        except ValueError:
            continue
        stamps.setdefault("first", at)
        for key, marker in (("start", "Starting simulation"), ("end", "Simulation ended")):
            if marker in parts[3]:
                stamps[key] = at
    if not {"first", "start", "end"} <= set(stamps):
        return float("nan"), float("nan")
    return ((stamps["start"] - stamps["first"]).total_seconds(),
            (stamps["end"] - stamps["start"]).total_seconds())


def percentiles(values: np.ndarray) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


def vidur_summary(run: Path, workload: Workload) -> dict:
    """Vidur's per-request metrics summarised as ``ServeRecords.summary`` does InferSim's."""
    requests = pd.read_csv(run / "request_metrics.csv").sort_values("Request Id")
    if len(requests) != len(workload):
        fail(f"Vidur finished {len(requests)} of {len(workload)} requests ({run})")
    ids = requests["Request Id"].to_numpy(int)
    arrival = workload.arrival_s[ids]
    e2e = requests["request_e2e_time"].to_numpy(float)
    makespan = float((arrival + e2e).max() - workload.arrival_s.min())
    tokens = float(workload.output_tokens[ids].sum())
    cdf = pd.read_csv(run / "plots" / "decode_token_execution_plus_preemption_time.csv")
    tbt = {f"p{q}": float(np.interp(q / 100, cdf["cdf"], cdf.iloc[:, -1])) for q in (50, 90, 99)}
    return {"ttft_s": percentiles(requests["prefill_e2e_time"].to_numpy(float)), "tbt_s": tbt,
            "e2e_s": percentiles(e2e), "throughput_tokens_per_s": tokens / makespan,
            "throughput_requests_per_s": len(requests) / makespan, "makespan_s": makespan,
            "restarts": int(requests["request_num_restarts"].sum())}


def run_infersim(trace: Path) -> tuple[float, dict]:
    command = [sys.executable, "-m", "simulator", "serve", "--model", MODEL, "--hardware", HARDWARE,
               "--trace", str(trace), "--scheduler", SCHEDULER.policy,
               "--max-batch", str(SCHEDULER.max_batch), "--max-batch-tokens", str(SCHEDULER.max_batch_tokens),
               "--block-size", str(SCHEDULER.block_size), "--preemption", SCHEDULER.preemption,
               "--no-prefix-caching", "--memory-fraction", str(MEMORY_FRACTION), "--json"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        fail(f"infersim serve failed: {done.stderr.strip()}")
    return wall, json.loads(done.stdout)


def relative(ours: float, theirs: float) -> str:
    return f"{(ours - theirs) / theirs * 100:+.0f} %" if theirs else "n/a"


def table(vidur: dict, infersim: dict, walls: dict[str, float],
          phases: dict[str, tuple[float, float]]) -> list[str]:
    """Markdown rows: wall times, then latency and throughput with InferSim's relative difference."""
    train_setup, train_loop = phases["train"]
    cached_setup, cached_loop = phases["cached"]
    lines = [
        "| | Vidur | InferSim | InferSim vs Vidur |", "|---|---|---|---|",
        f"| wall, first run (predictors trained) | {walls['vidur_train']:.1f} s (setup and training "
        f"{train_setup:.0f} s, event loop {train_loop:.0f} s) | {walls['infersim']:.1f} s | "
        f"{walls['vidur_train'] / walls['infersim']:.0f}x less |",
        f"| wall, cached predictors | {walls['vidur_cached']:.1f} s (setup {cached_setup:.0f} s, event loop "
        f"{cached_loop:.0f} s) | {walls['infersim']:.1f} s (simulation {infersim['sim_wall_s']:.2f} s) | "
        f"{walls['vidur_cached'] / walls['infersim']:.0f}x less |"]
    for metric, label, scale, unit in (("ttft_s", "TTFT", 1, "s"), ("tbt_s", "TBT", 1e3, "ms"),
                                       ("e2e_s", "end-to-end", 1, "s")):
        for q in ("p50", "p90", "p99"):
            theirs, ours = vidur[metric][q], infersim[metric][q]
            lines.append(f"| {label} {q} | {theirs * scale:.3g} {unit} | {ours * scale:.3g} {unit} | "
                         f"{relative(ours, theirs)} |")
    for metric, label in (("throughput_tokens_per_s", "throughput, output tokens/s"),
                          ("throughput_requests_per_s", "throughput, requests/s")):
        lines.append(f"| {label} | {vidur[metric]:.4g} | {infersim[metric]:.4g} | "
                     f"{relative(infersim[metric], vidur[metric])} |")
    lines.append(f"| preemptions (Vidur: restarts) | {vidur['restarts']} | {infersim['preemptions']} | |")
    return lines


SAMPLES = Path("docs/data/vidur/attention_a100_llama2_7b_tp1_samples.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vidur-python", required=True, help="python of a venv with vidur==0.0.26")
    parser.add_argument("--vidur-data", required=True, type=Path,
                        help="Vidur repository's data/ folder (or its parent)")
    parser.add_argument("--attention-samples", type=Path, default=SAMPLES,
                        help="rows of Vidur's attention.csv, used where that file is missing "
                             f"(default {SAMPLES}: 133 rows with their provenance in README.txt)")
    parser.add_argument("--requests", type=int, default=10_000,
                        help="first N requests of the trace (default 10,000)")
    parser.add_argument("--trace", default=TRACE, help=f"Splitwise-format trace (default {TRACE})")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="multiply the trace's arrival times (2 halves its rate; default 1)")
    parser.add_argument("--vidur-grid", choices=sorted(GRIDS), default="default",
                        help="Vidur's predictor grid search: its default, or quick (one forest, 2 folds)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args()
    if args.requests < 1:
        fail(f"--requests must be positive, got {args.requests}")
    version = check_vidur(args.vidur_python)
    files = profile_files(args.vidur_data, args.attention_samples)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_vidur-"))
    work.mkdir(parents=True, exist_ok=True)
    cache, out = work / "vidur_cache", work / "vidur_output"
    shutil.rmtree(cache, ignore_errors=True)  # the first run must train
    write_profiles(cache, files, args.attention_samples)
    workload = clip_lengths(read_trace(args.trace, max_requests=args.requests, time_scale=args.time_scale),
                            max_total=MAX_TOKENS)
    ours, theirs = write_traces(workload, work)
    blocks = kv_blocks()
    command = vidur_command(args.vidur_python, theirs.resolve(), blocks, cache.resolve(), out.resolve(),
                            args.vidur_grid)
    attention = "measured" if files["attention"] else f"rebuilt from {args.attention_samples}"

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average before {os.getloadavg()}")
    print(f"vidur {version}; {len(workload):,} requests of {args.trace} (arrival times x{args.time_scale:g}, "
          f"lengths clipped to {MAX_TOKENS} tokens, "
          f"sha1 {hashlib.sha1(ours.read_bytes()).hexdigest()[:12]}); {blocks:,} KV blocks of "
          f"{SCHEDULER.block_size}; Vidur grid search: {args.vidur_grid}; attention profile: {attention}; "
          f"work folder {work}")
    print("Vidur: python -c PATCHED_MAIN (vidur.main with the restart fix)", " ".join(command[3:]))
    walls, phases = {}, {}
    walls["vidur_train"], _ = run_vidur(command, work, work / "vidur_train.log")
    walls["vidur_cached"], run = run_vidur(command, work, work / "vidur_cached.log")
    for key in ("train", "cached"):
        phases[key] = log_phases(work / f"vidur_{key}.log")
    walls["infersim"], infersim = run_infersim(ours)
    vidur = vidur_summary(run, workload)
    print("\n".join(table(vidur, infersim, walls, phases)))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
