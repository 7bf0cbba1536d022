"""Pareto fronts, the best plan under SLOs, cost per million tokens, and the sweep flags for them."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import simulator
from simulator.cli import main
from simulator.errors import InferSimError
from simulator.study.cost import add_cost, load_prices
from simulator.study.pareto import best_plan, non_dominated, pareto_front, parse_objectives

ROOT = Path(__file__).resolve().parents[1]


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a <= b) and np.any(a < b))


def brute_force(points: np.ndarray) -> np.ndarray:
    return np.array([not any(dominates(q, p) for q in points) for p in points], dtype=bool)


# Small integers so that ties and duplicate points are common.
POINTS = st.integers(1, 4).flatmap(lambda k: hnp.arrays(
    np.float64, st.tuples(st.integers(0, 40), st.just(k)), elements=st.integers(0, 6).map(float)))


@settings(max_examples=300, deadline=None)
@given(POINTS)
def test_non_dominated_equals_brute_force(points):
    assert np.array_equal(non_dominated(points), brute_force(points))


def study_frame(seed: int = 0, n: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"model": "m", "hardware": rng.choice(["h100-sxm", "a100-80gb-sxm"], n),
                          "tp": rng.choice([1, 2, 4, 8], n), "batch": rng.integers(1, 65, n),
                          "tpot_s": rng.uniform(0.01, 0.1, n).round(3), "ttft_s": rng.uniform(0.05, 3, n),
                          "throughput_tokens_per_s": rng.uniform(10, 5000, n).round(0),
                          "feasible": rng.random(n) > 0.3})
    frame["reason"] = np.where(frame.feasible, None, "does not fit")
    return frame


@pytest.mark.parametrize("objectives", [
    {"tpot_s": "min", "throughput_tokens_per_s": "max"},
    {"tpot_s": "min", "throughput_tokens_per_s": "max", "ttft_s": "min"},
    {"throughput_per_device": "max", "ttft_s": "min"},
])
def test_front_members_are_undominated_and_dominate_the_rest(objectives):
    frame = study_frame()
    front = pareto_front(frame, objectives)
    assert len(front) and front.feasible.all()
    feasible = frame[frame.feasible].copy()
    feasible["devices"] = feasible.tp
    feasible["throughput_per_device"] = feasible.throughput_tokens_per_s / feasible.tp
    sign = np.array([1.0 if d == "min" else -1.0 for d in objectives.values()])
    points = feasible[list(objectives)].to_numpy(dtype=float) * sign
    members = np.isin(feasible.index, front.index)
    for p in points[members]:
        assert not any(dominates(q, p) for q in points)
    for p in points[~members]:
        assert any(dominates(q, p) for q in points[members])


def test_front_leaves_out_infeasible_rows_and_missing_values():
    frame = pd.DataFrame({"tpot_s": [0.01, 0.02, 0.03, np.nan],
                          "throughput_tokens_per_s": [100.0, 900.0, 50.0, 1e6],
                          "feasible": [False, True, True, True]})
    front = pareto_front(frame)
    assert list(front.index) == [1]  # row 0 would dominate but does not fit; row 3 has no TPOT


def test_objectives_parse_and_bad_ones_name_the_flag():
    assert parse_objectives("tpot_s:min,throughput:max") == {"tpot_s": "min",
                                                            "throughput_tokens_per_s": "max"}
    assert parse_objectives("cost") == {"cost_usd_per_million_tokens": "min"}
    for text in ("tpot_s:up", "tpot_s", ","):
        with pytest.raises(InferSimError, match="--pareto"):
            parse_objectives(text)
    with pytest.raises(InferSimError, match="not a column"):
        pareto_front(study_frame(), {"latency": "min"})


def test_best_plan_meets_the_slos_and_names_what_binds():
    frame = pd.DataFrame({"model": "m", "hardware": "h100-sxm", "tp": [1, 2, 4, 8], "batch": 8,
                          "ttft_s": [0.41, 0.2, 0.25, 0.1], "tpot_s": [0.02, 0.06, 0.03, 0.01],
                          "throughput_tokens_per_s": [4000.0, 3000.0, 2000.0, 2500.0],
                          "feasible": True, "reason": None})
    best = best_plan(frame, slo_ttft_s=0.3, slo_tpot_s=0.05, objective="throughput")
    # tp 1 is best but misses TTFT; tp 2 misses TPOT; of the two that qualify tp 8 is faster.
    assert best.plan["tp"] == 8 and best.candidates == 2 and best.excluded_better == 2
    assert best.runner_up["tp"] == 1 and "TTFT 0.41 s > 0.3 s SLO" in best.why
    cheapest = best_plan(frame, slo_tpot_s=0.05, objective="cost")
    # cost per token = tp x price / throughput: tp 1 (4,000 tok/s on one device) is cheapest
    assert cheapest.plan["tp"] == 1 and "SLOs bind nothing" in cheapest.why
    none = best_plan(frame, slo_ttft_s=0.05, objective="throughput")
    assert none.plan is None and "TTFT" in none.why
    json.dumps(best.to_dict(), default=str)


def test_cost_per_million_tokens_by_hand():
    prices = load_prices()
    frame = simulator.sweep(rows=[{"model": "llama-2-7b", "hardware": "dgx-h100", "tp": 2, "batch": 8,
                                   "input_len": 128},
                                  {"model": "llama-2-7b", "hardware": "t4", "batch": 1, "input_len": 128}])
    row = frame.iloc[0]
    assert row.devices == 2 and row.usd_per_device_hour == prices["h100-sxm"].usd_per_hour == 4.176
    by_hand = 2 * 4.176 / (row.throughput_tokens_per_s * 3600) * 1e6
    assert row.cost_usd_per_million_tokens == pytest.approx(by_hand, rel=1e-12)
    assert np.isnan(frame.cost_usd_per_million_tokens[1]) and "no price for t4" in frame.cost_note[1]
    mine = add_cost(frame, {"t4": 0.5, "h100-sxm": 1.0})
    assert mine.cost_usd_per_million_tokens[1] == pytest.approx(
        0.5 / (frame.throughput_tokens_per_s[1] * 3600) * 1e6)
    assert mine.cost_usd_per_million_tokens[0] == pytest.approx(by_hand / 4.176)
    assert "cost_usd_per_million_tokens" not in simulator.sweep(rows=[{"batch": 1}], prices=False)


def test_every_shipped_price_names_a_device_and_its_source():
    from simulator.specs.loader import shipped_devices

    for name, price in load_prices().items():
        assert name in shipped_devices() and price.usd_per_hour > 0
        assert price.source.startswith("https://") and price.retrieved


SWEEP = """axes:
  model: llama-2-13b
  hardware: [dgx-a100, dgx-h100]
  tp: [1, 2]
  batch: [1, 8, 32, 128]
  input_len: 512
  output_len: 64
"""


def test_sweep_prints_front_and_best_and_draws_the_plot(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP)
    out, plot = tmp_path / "s.parquet", tmp_path / "front.png"
    assert main(["sweep", str(path), "--out", str(out), "--pareto", "tpot_s:min,throughput_tokens_per_s:max",
                 "--best", "cost", "--slo-ttft", "1", "--slo-tpot", "0.05", "--plot", str(plot),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    frame = pd.read_parquet(out)
    assert {"devices", "cost_usd_per_million_tokens", "cost_note"} <= set(frame.columns)
    assert plot.stat().st_size > 10_000
    best = summary["best"]["plan"]
    qualify = frame[frame.feasible & (frame.ttft_s <= 1) & (frame.tpot_s <= 0.05)]
    assert best["cost_usd_per_million_tokens"] == pytest.approx(qualify.cost_usd_per_million_tokens.min())
    assert len(summary["pareto"]["plans"]) == len(pareto_front(frame))
    assert main(["sweep", str(path), "--out", str(out), "--pareto", "cost,throughput_per_device",
                 "--best", "throughput_per_device", "--slo-tpot", "0.03"]) == 0
    text = capsys.readouterr().out
    assert "Pareto front" in text and "best:" in text and "why:" in text


@pytest.mark.parametrize("flags, fragment", [
    (["--pareto", "tpot_s:up"], "--pareto"),
    (["--pareto", "latency:min"], "--pareto"),
    (["--best", "speed:max"], "--best"),
    (["--slo-ttft", "-1", "--best", "cost"], "--slo-ttft"),
    (["--slo-tpot", "0.05"], "--best"),
    (["--plot", "x.png"], "--plot needs --pareto"),
    (["--pareto", "tpot_s:min", "--plot", "x.png"], "--plot draws two"),
    (["--pareto", "tpot,ttft", "--plot", "x.txt"], "--plot"),
    (["--prices", "nowhere.yaml"], "--prices"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, flags, fragment):
    path = tmp_path / "s.yaml"
    path.write_text("axes: {model: tiny-dense-58m, batch: [1, 2]}\n")
    assert main(["sweep", str(path), "--out", str(tmp_path / "o.csv"), *flags]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and fragment in message


def test_bad_prices_file_names_the_field(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("prices: {h100-sxm: {usd_per_hour: -3}}\n")
    with pytest.raises(InferSimError, match=r"prices\.h100-sxm\.usd_per_hour"):
        load_prices(path)


def test_the_example_answers_the_cheapest_llama_70b_plan(tmp_path, capsys):
    example = ROOT / "workloads" / "sweeps" / "llama-70b-cheapest.yaml"
    assert main(["sweep", str(example), "--out", str(tmp_path / "o.parquet"), "--best", "cost",
                 "--slo-ttft", "1", "--slo-tpot", "0.05", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["best"]["plan"]
    assert best["ttft_s"] <= 1 and best["tpot_s"] <= 0.05 and best["feasible"]
