"""The serving engine: conservation, bounds, the single-request limit, policies, pools, power."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator import estimate
from simulator.cli import main
from simulator.engine.scheduler import SchedulerConfig
from simulator.engine.serve import serve
from simulator.engine.stepcost import ReplicaCost, power_capped
from simulator.engine.workload import Workload, read_trace, synthetic
from simulator.errors import InferSimError
from simulator.estimate import resolve_precision
from simulator.specs.loader import load_model, load_system

MODEL, GPU = "llama-2-7b", "a100-80gb-sxm"
TRACE = "../shared/traces/azure-llm-inference-2023/splitwise_conv.csv"


def _workload(n: int = 60, rate: float = 20.0, seed: int = 0, prompt: str = "uniform:16:600",
              output: str = "uniform:1:120") -> Workload:
    return synthetic(n, rate, prompt, output, seed=seed)


def _check_conserved(records, workload: Workload, policy: str) -> None:
    req = records.requests
    assert req["completion_s"].notna().all()
    assert len(req) == len(workload) and req["request_id"].is_unique
    assert (req["first_token_s"] >= req["arrival_s"]).all()
    assert (req["completion_s"] >= req["first_token_s"]).all()
    it = records.iterations
    assert (it["kv_blocks_used"] <= it["kv_blocks_total"]).all()
    assert (it["end_s"] >= it["start_s"]).all()
    if policy != "static" and req["preemptions"].sum() == 0:
        assert it["decode_tokens"].sum() == int((workload.output_tokens - 1).sum())
        assert it["prefill_tokens"].sum() == int(workload.prompt_tokens.sum())
    # One gap per token after the first.
    assert len(records.token_gaps_s) == int((workload.output_tokens - 1).sum())


@pytest.mark.parametrize("policy", ["static", "continuous", "chunked", "decode-priority"])
def test_every_request_served_once_with_its_tokens(policy):
    workload = _workload()
    records = serve(MODEL, GPU, workload, SchedulerConfig(policy=policy, max_batch=16, chunk_size=256))
    _check_conserved(records, workload, policy)
    # Iterations on one replica never overlap.
    it = records.iterations.sort_values("start_s")
    assert (it["start_s"].to_numpy()[1:] >= it["end_s"].to_numpy()[:-1] - 1e-12).all()


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 40), rate=st.floats(0.5, 200), seed=st.integers(0, 100),
       policy=st.sampled_from(["continuous", "chunked", "decode-priority"]),
       fraction=st.floats(0.42, 0.9))
def test_conservation_and_capacity_under_pressure(n, rate, seed, policy, fraction):
    """Tight memory forces preemptions; still nothing lost, nothing twice, blocks within capacity."""
    workload = _workload(n, rate, seed, prompt="uniform:16:2000", output="uniform:1:1500")
    records = serve("llama-2-13b", GPU, workload, SchedulerConfig(policy=policy, chunk_size=512),
                    memory_fraction=fraction)
    _check_conserved(records, workload, policy)


def test_ttft_at_least_the_prefill_alone():
    workload = _workload(80, 50.0)
    records = serve(MODEL, GPU, workload, SchedulerConfig(policy="chunked", chunk_size=256))
    system = load_system(GPU)
    cost = ReplicaCost(load_model(MODEL), system, resolve_precision(system.device, "bf16", None, "bf16", 128),
                       max_tokens=8192, max_context=1024)
    req = records.requests
    alone = np.array([cost.prefill_alone_s(int(p)) for p in req["prompt_tokens"]])
    assert ((req["first_token_s"] - req["arrival_s"]).to_numpy() >= alone * (1 - 1e-9)).all()


@pytest.mark.parametrize("model,prompt,output", [("llama-2-7b", 512, 128), ("deepseek-v2-lite", 1000, 64),
                                                 ("mistral-7b", 3000, 32)])
def test_low_rate_matches_the_single_request_estimate(model, prompt, output):
    """Requests far apart run alone: TTFT and TPOT equal estimate()'s at batch 1."""
    hardware = "h100-sxm"
    workload = synthetic(8, 0.01, prompt, output, seed=1)
    records = serve(model, hardware, workload, memory_fraction=0.95)
    single = estimate(model, hardware, batch=1, input_len=prompt, output_len=output)
    ttft = (records.requests["first_token_s"] - records.requests["arrival_s"]).to_numpy()
    assert np.allclose(ttft, single.ttft_s, rtol=1e-6)
    assert np.mean(records.token_gaps_s) == pytest.approx(single.tpot_s, rel=1e-3)


def test_throughput_within_the_step_model_maximum():
    workload = _workload(200, 1000.0, prompt="64", output="64")
    config = SchedulerConfig(max_batch=32)
    records = serve(MODEL, GPU, workload, config)
    system = load_system(GPU)
    cost = ReplicaCost(load_model(MODEL), system, resolve_precision(system.device, "bf16", None, "bf16", 128),
                       max_tokens=8192, max_context=256)
    # The fastest possible token rate: a full decode batch at the shortest context.
    best = 32 / cost.iteration(np.zeros(0, int), np.zeros(0, int), np.full(32, 2), 32)[0]
    assert records.summary()["throughput_tokens_per_s"] <= best


@settings(max_examples=8, deadline=None)
@given(low=st.floats(120, 390), high=st.floats(120, 400))
def test_higher_power_cap_never_slower(low, high):
    low, high = min(low, high), max(low, high)
    workload = _workload(30, 30.0, prompt="uniform:200:1500", output="uniform:8:64")
    slow = serve(MODEL, GPU, workload, power_cap_w=low).summary()
    fast = serve(MODEL, GPU, workload, power_cap_w=high).summary()
    assert fast["makespan_s"] <= slow["makespan_s"] * (1 + 1e-9)
    assert fast["e2e_s"]["p50"] <= slow["e2e_s"]["p50"] * (1 + 1e-9)
    assert fast["power_w"]["peak"] <= high + 1e-6 or high >= 400


def test_power_cap_slows_compute_not_bandwidth():
    device = load_system(GPU).device
    capped = power_capped(device, (device.power.idle + device.power.max) / 2)
    assert capped.compute["bf16"] < device.compute["bf16"]
    assert capped.main_memory.bandwidth == device.main_memory.bandwidth
    with pytest.raises(InferSimError, match="idle"):
        power_capped(device, device.power.idle / 2)


@pytest.mark.parametrize("explicit", [False, True])
def test_power_cap_scales_energy_per_flop_by_the_clock_squared(explicit):
    """Dynamic power ~ f V^2 with V ~ f: at clock ratio s a FLOP costs s^2 of its energy, whether
    the spec gives the energy or it is derived from the dynamic range (once scaled s^5)."""
    from simulator.cost.roofline import op_power_w

    device = load_system(GPU).device
    if explicit:
        device = device.model_copy(update={"power": device.power.model_copy(
            update={"energy_per_flop": 0.5e-12})})
    capped = power_capped(device, 250.0)
    s = capped.compute["bf16"] / device.compute["bf16"]

    def joules_per_flop(d):
        return (op_power_w(d, 1e12, 0.0, d.compute["bf16"], 1.0) - d.power.idle) / 1e12

    assert joules_per_flop(capped) / joules_per_flop(device) == pytest.approx(s**2)


def test_littles_law_on_the_records():
    """Time-average of requests in the system (swept over arrival and completion events) equals
    arrival rate times mean time in system."""
    records = serve(MODEL, GPU, _workload(150, 15.0))
    req = records.requests
    events = np.concatenate([req["arrival_s"], req["completion_s"]])
    steps = np.concatenate([np.ones(len(req)), -np.ones(len(req))])
    order = np.argsort(events, kind="stable")
    t, d = events[order], steps[order]
    in_system = np.cumsum(d)[:-1]
    span = t[-1] - t[0]
    mean_in_system = float(np.sum(in_system * np.diff(t))) / span
    rate = len(req) / span
    mean_time = float((req["completion_s"] - req["arrival_s"]).mean())
    assert mean_in_system == pytest.approx(rate * mean_time, rel=1e-9)


def test_chunked_prefill_cuts_the_tbt_tail():
    """Sarathi-Serve: long prompts arriving among decodes stall them under prefill priority."""
    workload = _workload(120, 8.0, prompt="uniform:1000:3000", output="uniform:64:256")
    cont = serve(MODEL, GPU, workload, SchedulerConfig(policy="continuous")).summary()
    chunk = serve(MODEL, GPU, workload, SchedulerConfig(policy="chunked", chunk_size=512)).summary()
    assert chunk["tbt_s"]["p99"] < cont["tbt_s"]["p99"]


def test_chunked_budget_respected():
    records = serve(MODEL, GPU, _workload(60, 40.0), SchedulerConfig(policy="chunked", chunk_size=300))
    it = records.iterations
    assert (it["prefill_tokens"] + it["decode_tokens"]).max() <= 300


def test_prefix_caching_saves_prefill():
    workload = synthetic(80, 20.0, "uniform:600:900", "32", seed=3, prefix_tokens=512, prefix_groups=2)
    with_cache = serve(MODEL, GPU, workload)
    without = serve(MODEL, GPU, workload, SchedulerConfig(prefix_caching=False))
    assert with_cache.iterations["prefill_tokens"].sum() < without.iterations["prefill_tokens"].sum()
    assert with_cache.summary()["ttft_s"]["p50"] < without.summary()["ttft_s"]["p50"]


def test_swap_preemption_costs_link_time():
    workload = _workload(40, 100.0, prompt="uniform:500:2000", output="uniform:200:1500")
    records = serve("llama-2-13b", "workstation-4090", workload, SchedulerConfig(preemption="swap"),
                    weight_dtype="int4", memory_fraction=0.9)
    _check_conserved(records, workload, "continuous")
    assert records.requests["preemptions"].sum() > 0


def test_disaggregated_pools_and_link():
    workload = _workload(60, 10.0)
    fast = serve(MODEL, "dgx-a100", workload, prefill_hardware="dgx-a100", decode_hardware="dgx-a100",
                 kv_link="100 GB/s")
    slow = serve(MODEL, "dgx-a100", workload, prefill_hardware="dgx-a100", decode_hardware="dgx-a100",
                 kv_link="0.5 GB/s")
    req = fast.requests
    assert set(req["pool"]) == {"decode"} | ({"prefill"} if (workload.output_tokens == 1).any() else set())
    assert slow.summary()["e2e_s"]["p50"] > fast.summary()["e2e_s"]["p50"]
    assert set(fast.iterations["pool"]) == {"prefill", "decode"}
    # Prefill replicas never decode.
    assert fast.iterations.loc[fast.iterations["pool"] == "prefill", "decode_tokens"].sum() == 0


def test_replicas_share_the_load():
    from simulator.strategies.parallel import ParallelPlan

    workload = _workload(100, 40.0)
    one = serve(MODEL, "dgx-a100", workload).summary()
    four = serve(MODEL, "dgx-a100", workload, parallel=ParallelPlan(dp=4)).summary()
    assert four["ttft_s"]["p90"] < one["ttft_s"]["p90"]
    tp = serve(MODEL, "dgx-a100", workload, parallel=ParallelPlan(tp=2)).summary()
    assert tp["completed"] == 100


def test_trace_reading_and_determinism():
    workload = read_trace(TRACE, max_requests=200)
    assert len(workload) == 200 and workload.arrival_s[0] == 0.0
    a = serve(MODEL, GPU, synthetic(50, 5.0, "lognormal:300:0.5", "uniform:1:50", seed=7)).summary()
    b = serve(MODEL, GPU, synthetic(50, 5.0, "lognormal:300:0.5", "uniform:1:50", seed=7)).summary()
    assert a["ttft_s"] == b["ttft_s"] and a["tbt_s"] == b["tbt_s"]


def test_cli_serve_json_and_records(tmp_path, capsys):
    out = tmp_path / "req.csv"
    assert main(["serve", "--model", MODEL, "--hardware", GPU, "--rate", "5", "--requests", "20",
                 "--input-len", "256", "--output-len", "32", "--json", "--records-out", str(out),
                 "--plots", str(tmp_path / "plots")]) == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    for key in ("completed", "throughput_tokens_per_s", "throughput_requests_per_s", "ttft_s", "tbt_s",
                "e2e_s", "goodput_requests_per_s", "preemptions", "energy_j_per_token", "power_w",
                "makespan_s", "sim_wall_s"):
        assert key in summary
    assert summary["completed"] == 20 and out.is_file()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["latency_cdf.png", "timeline.png"]


@pytest.mark.parametrize("argv,message", [
    (["--rate", "0", "--requests", "3"], "rate must be positive"),
    (["--rate", "1"], "--requests"),
    (["--trace", "nope.csv"], "no such trace"),
    (["--rate", "1", "--requests", "3", "--input-len", "lognormal:x"], "length distribution"),
    (["--rate", "1", "--requests", "3", "--model", "llama-2-70b"], "KV cache holds"),
    (["--rate", "1", "--requests", "3", "--input-len", "9000"], "max_position_embeddings"),
    (["--rate", "1", "--requests", "3", "--power-cap", "10"], "idle power"),
])
def test_cli_serve_bad_input(argv, message, capsys):
    assert main(["serve", "--hardware", GPU, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_capacity_bisects_to_the_slo_edge():
    from simulator.engine.capacity import attainment, capacity

    def serve_at(rate):
        return serve(MODEL, GPU, synthetic(120, rate, "uniform:200:1200", "uniform:16:128", seed=2),
                     SchedulerConfig(policy="chunked"))

    tight = capacity(serve_at, 0.3, 0.08, start=2.0, tolerance=0.1)
    loose = capacity(serve_at, 2.0, 0.08, start=2.0, tolerance=0.1)
    assert tight.rate > 0 and tight.attainment >= 0.9
    assert loose.rate >= tight.rate
    assert attainment(serve_at(tight.rate * 3), 0.3, 0.08) < 0.9
    with pytest.raises(InferSimError, match="objective"):
        capacity(serve_at, None, None)


def test_trace_out_and_parquet(tmp_path):
    import json

    trace, parquet = tmp_path / "t.json", tmp_path / "it.parquet"
    assert main(["serve", "--model", MODEL, "--hardware", "dgx-a100", "--dp", "2", "--rate", "8",
                 "--requests", "30", "--trace-out", str(trace), "--iterations-out", str(parquet)]) == 0
    events = json.loads(trace.read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in slices} == {1, 2}  # two replicas, each its own track
    assert sum(e["ph"] == "b" for e in events) == 30
    import pandas as pd

    assert len(pd.read_parquet(parquet)) == len(slices)


def test_speculative_decoding_in_the_engine():
    from simulator.strategies.speculative import Speculation

    workload = _workload(40, 4.0, prompt="uniform:100:800", output="uniform:2:200")
    plain = serve("llama-2-13b", GPU, workload).summary()
    results = {}
    for alpha in (0.0, 0.7, 1.0):
        records = serve("llama-2-13b", GPU, workload, speculative=Speculation("tiny-dense-58m", 4, alpha))
        req = records.requests
        assert req["completion_s"].notna().all()
        # Exactly the tokens asked for: one gap per token after the first, never more.
        assert len(records.token_gaps_s) == int((workload.output_tokens - 1).sum())
        results[alpha] = records.summary()
    assert results[0.0]["tbt_s"]["p50"] > plain["tbt_s"]["p50"]  # rejecting everything only costs
    assert results[1.0]["e2e_s"]["p50"] < results[0.7]["e2e_s"]["p50"] < plain["e2e_s"]["p50"]
    with pytest.raises(InferSimError, match="static"):
        serve("llama-2-13b", GPU, workload, SchedulerConfig(policy="static"),
              speculative=Speculation("tiny-dense-58m", 4, 0.5))


def test_power_budget_fits_more_capped_servers(capsys):
    import json

    from simulator.engine.power import servers_under_budget

    out = servers_under_budget(10_000, 8, 700, 400, observed_peak_w=2500)
    assert out["servers_at_nameplate"] == 1 and out["servers_capped"] == 3
    assert out["servers_at_observed_peak"] == 4
    assert main(["serve", "--model", MODEL, "--hardware", "dgx-a100", "--tp", "8", "--rate", "4",
                 "--requests", "40", "--power-cap", "300", "--power-budget", "50000", "--json"]) == 0
    budget = json.loads(capsys.readouterr().out)["power_budget"]
    assert budget["servers_capped"] >= budget["servers_at_nameplate"]
    assert budget["server_observed_peak_w"] <= budget["server_capped_w"] + 1e-6


@pytest.mark.parametrize("kwargs", [
    {},
    {"parallel": "dp3-rr-chunked"},
    {"memory_fraction": 0.45, "model": "llama-2-13b"},
    {"disaggregated": True},
    {"rate": 300.0, "scheduler": SchedulerConfig(max_batch=16)},
    {"rate": 300.0, "scheduler": SchedulerConfig(policy="decode-priority", max_batch_tokens=2048)},
    {"rate": 300.0, "scheduler": SchedulerConfig(policy="chunked", chunk_size=128)},
    {"rate": 40.0, "scheduler": SchedulerConfig(policy="chunked", chunk_size=96), "attention": "naive"},
])
def test_decode_runs_match_stepping_one_iteration_at_a_time(kwargs):
    """Costing decode-only stretches as one array (cut short by arrivals) changes nothing."""
    from simulator.strategies.parallel import ParallelPlan

    kwargs = dict(kwargs)
    model = kwargs.pop("model", MODEL)
    workload = _workload(150, kwargs.pop("rate", 12.0), prompt="uniform:16:1500", output="uniform:1:400")
    options: dict = {}
    if kwargs.pop("parallel", None):
        options = {"parallel": ParallelPlan(dp=3), "router": "round-robin",
                   "scheduler": SchedulerConfig(policy="chunked")}
        hardware = "dgx-a100"
    elif kwargs.pop("disaggregated", False):
        options = {"prefill_hardware": "dgx-a100", "decode_hardware": "dgx-a100", "kv_link": "5 GB/s",
                   "decode_replicas": 2}
        hardware = "dgx-a100"
    else:
        hardware = GPU
    options.update(kwargs)
    fast = serve(model, hardware, workload, **options)
    slow = serve(model, hardware, workload, fast_forward=False, **options)
    a, b = fast.requests.sort_values("request_id"), slow.requests.sort_values("request_id")
    for column in ("first_token_s", "completion_s", "energy_j", "tbt_max_s", "preemptions"):
        assert np.allclose(a[column], b[column], rtol=1e-9, atol=1e-12), column
    assert np.allclose(np.sort(fast.token_gaps_s), np.sort(slow.token_gaps_s), rtol=1e-9, atol=1e-12)
    order = ["replica", "start_s"]
    fi, si = fast.iterations.sort_values(order), slow.iterations.sort_values(order)
    for column in ("start_s", "end_s", "decode_tokens", "prefill_tokens", "kv_blocks_used", "power_w"):
        got, want = fi[column].to_numpy(dtype=float), si[column].to_numpy(dtype=float)
        assert np.allclose(got, want, rtol=1e-9), column


def test_one_stage_plan_shortcut_equals_the_parallel_step_time():
    from simulator.graph.transformer import Precision
    from simulator.strategies.parallel import ParallelPlan

    for model, hardware, plan in (("llama-2-70b", "dgx-a100", ParallelPlan(tp=8, overlap="partial")),
                                  ("mixtral-8x7b", "dgx-h100", ParallelPlan(tp=4))):
        spec, system = load_model(model), load_system(hardware)
        fast = ReplicaCost(spec, system, Precision(), "flash", plan, max_tokens=1024, max_context=2048)
        slow = ReplicaCost(spec, system, Precision(), "flash", plan, max_tokens=1024, max_context=2048)
        slow._plan_fast = False
        for args in ((np.array([300]), np.array([0]), np.array([50, 700, 1200]), 4),
                     (np.zeros(0, int), np.zeros(0, int), np.array([5, 900]), 2)):
            assert np.allclose(fast.iteration(*args), slow.iteration(*args), rtol=1e-12)
        assert np.allclose(fast.decode_run(np.array([10, 400]), 5), slow.decode_run(np.array([10, 400]), 5),
                           rtol=1e-12)


def test_serving_scenario_runs(capsys):
    import json

    from simulator.scenario import serve_scenario

    records, summary = serve_scenario("workloads/scenarios/serving/llama-2-70b-conv.yaml")
    assert summary["completed"] == 2000 and len(records.iterations) == summary["iterations"]
    assert main(["run", "workloads/scenarios/serving/llama-2-70b-conv.yaml", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 2000


def test_power_cap_keeps_memory_energy_per_byte():
    """The cap slows the cores, not the memory: a byte moved costs the same energy."""
    from simulator.cost.roofline import op_power_w

    device = load_system(GPU).device
    capped = power_capped(device, (device.power.idle + device.power.max) / 2)
    nbytes, seconds = 1e9, 1e9 / device.main_memory.bandwidth
    uncapped_w = op_power_w(device, 0.0, nbytes, device.compute["bf16"], seconds) - device.power.idle
    capped_w = op_power_w(capped, 0.0, nbytes, capped.compute["bf16"], seconds) - capped.power.idle
    assert capped_w == pytest.approx(uncapped_w, rel=1e-9)
