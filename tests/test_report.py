"""``infersim report`` / ``write_report``: a study table's plots and summary."""

import json

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

import simulator
from simulator.cli import main
from simulator.errors import InferSimError
from simulator.report.study_report import (
    CATEGORIES,
    breakdown,
    default_heatmap_axes,
    op_category,
    prepare,
    top_plans,
    write_report,
)
from simulator.study.pareto import costs_matrix, non_dominated, pareto_front

AXES = {"model": "llama-2-7b", "hardware": ["dgx-a100", "dgx-h100"], "tp": [1, 2],
        "batch": [1, 8, 64, 512], "input_len": [512, 2048], "output_len": 64}
"""32 configurations, costed as arrays; batch 512 does not fit at tp 1 or 2."""
PNGS = ("pareto", "latency", "memory", "roofline", "heatmap")
OBJECTIVES = {"throughput_per_device": "max", "tokens_per_s_per_user": "max"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    frame = simulator.sweep(AXES)
    path = folder / "study.parquet"
    frame.to_parquet(path, index=False)
    return path, frame


@pytest.fixture(scope="module")
def report(study, tmp_path_factory):
    path, _ = study
    return write_report(path, tmp_path_factory.mktemp("report"))


def top_table(summary: str) -> pd.DataFrame:
    """The summary's top-plans table as strings."""
    lines = summary.splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("## Top"))
    rows = [line for line in lines[start:] if line.startswith("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return pd.DataFrame(cells[2:], columns=cells[0])


def number(text: str) -> float:
    return float(text.replace(",", "").replace("$", "").split()[0])


def test_every_file_is_written_and_the_pngs_are_images(report):
    assert set(report) == {*PNGS, "front", "summary"}
    for kind in PNGS:
        path = report[kind]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = mpimg.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300
        assert image[..., :3].std() > 0.02  # not a blank canvas
    summary = report["summary"].read_text()
    for kind in PNGS:
        assert f"]({report[kind].name})" in summary  # linked and shown


def test_summary_counts_and_reasons(study, report):
    _, frame = study
    summary = report["summary"].read_text()
    assert f"configurations: {len(frame):,}, feasible: {int(frame.feasible.sum()):,}" in summary
    section = summary.split("## Infeasible configurations")[1].split("##")[0]
    counts = [int(line.rsplit("|", 2)[1].replace(",", "")) for line in section.splitlines()
              if line.startswith("| ") and not line.startswith("| reason")]
    assert sum(counts) == int((~frame.feasible).sum()) > 0


def test_summary_lists_the_top_plans_in_order_of_the_objective(study, report):
    _, frame = study
    table = top_table(report["summary"].read_text())
    values = [number(v) for v in table["tok/s/device"]]
    assert len(values) == 5 and values == sorted(values, reverse=True)
    best = prepare(frame)
    best = best[best.feasible]["throughput_per_device"].max()
    assert values[0] == pytest.approx(best, rel=1e-3)
    # The study's four plans (hardware x tp) each at its best, then the next best configuration.
    assert len(set(zip(table["hardware"], table["tp"], strict=True))) == 4


def test_top_plans_are_each_plans_best_then_the_next_best():
    frame = prepare(simulator.sweep({**AXES, "hardware": "dgx-h100"}))
    top = top_plans(frame, OBJECTIVES, 4)
    assert list(top["throughput_per_device"]) == sorted(top["throughput_per_device"], reverse=True)
    firsts = top.drop_duplicates("plan")
    assert len(firsts) == 2  # tp 1 and tp 2, each at its best
    for _, row in firsts.iterrows():
        same = frame[frame.feasible & (frame.plan == row.plan)]
        assert row.throughput_per_device == same.throughput_per_device.max()


def test_the_plotted_front_has_no_dominated_point(study, report):
    _, frame = study
    front = pd.read_csv(report["front"])
    points = costs_matrix(front, OBJECTIVES)
    assert len(front) > 1 and non_dominated(points).all()
    # ... and every other feasible configuration is dominated by one of its points.
    everything = prepare(frame)
    everything = everything[everything.feasible]
    assert len(front) == len(pareto_front(everything, OBJECTIVES))
    others = costs_matrix(everything, OBJECTIVES)
    on_front = (others[:, None, :] == points[None, :, :]).all(axis=2).any(axis=1)
    dominated = ((points[None, :, :] <= others[:, None, :]).all(axis=2)
                 & (points[None, :, :] < others[:, None, :]).any(axis=2)).any(axis=1)
    assert (on_front | dominated).all()


def test_breakdown_adds_up_to_the_step_times():
    for kwargs in ({"parallel": simulator.ParallelPlan(tp=2)},
                   {"offload": simulator.OffloadPlan(weights_host=0.5)}):
        hardware = "dgx-h100" if "parallel" in kwargs else "workstation-4090"
        result = simulator.estimate("llama-2-7b", hardware, batch=8, input_len=256, output_len=32, **kwargs)
        parts = breakdown(result)
        assert parts["prefill"].keys() == set(CATEGORIES)
        assert sum(parts["prefill"].values()) == pytest.approx(result.ttft_s, rel=1e-9)
        assert sum(parts["decode"].values()) == pytest.approx(result.tpot_s, rel=1e-9)
        assert parts["decode"]["communication and transfers (exposed)"] > 0


def test_every_op_of_dense_and_moe_models_has_a_category():
    for model in ("llama-2-7b", "mixtral-8x7b", "deepseek-v2-lite"):
        ops = simulator.estimate(model, "h100-sxm", batch=1, input_len=128, output_len=4,
                                 check_memory=False).ops_frame()
        for name, kind in ops[["op", "kind"]].itertuples(index=False, name=None):
            category = op_category(name, kind)
            assert category in CATEGORIES
            assert (category == "other") == (kind in ("embedding", "sampling")), name
        moe = ops[ops.op.str.startswith(("experts_", "router"))]
        assert all(op_category(n, k) == "MLP / experts" for n, k in zip(moe.op, moe.kind, strict=True))


def test_default_heat_map_axes():
    frame = pd.DataFrame({"model": "m", "hardware": ["a", "b"] * 6, "batch": [1, 2, 4] * 4,
                          "input_len": 512, "output_len": 64, "tp": [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2],
                          "feasible": True, "tpot_s": 0.01})
    assert default_heatmap_axes(frame) == ("batch", "hardware")
    assert default_heatmap_axes(frame.assign(input_len=[128, 256] * 6)) == ("batch", "input_len")
    assert default_heatmap_axes(frame.assign(hardware="a", tp=1)) is None


def test_cli_with_flags_and_a_csv_of_strategies(tmp_path, capsys):
    rows = [{"model": "llama-2-13b", "hardware": "workstation-4090", "batch": 4,
             "offload_weights": "host=0.5"},
            {"model": "llama-2-7b", "hardware": "a100-80gb-sxm", "batch": 4, "kv_policy": "h2o",
             "kv_budget": 0.25},
            {"model": "llama-2-7b", "hardware": "a100-80gb-sxm", "batch": 8}]
    path = tmp_path / "rows.csv"
    simulator.sweep(rows=rows).to_csv(path, index=False)  # gaps in a CSV read back as NaN
    out = tmp_path / "report"
    assert main(["report", str(path), "--out", str(out), "--top", "2", "--objectives", "ttft,throughput",
                 "--heatmap", "model,batch,energy_j_per_token", "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert all((out / name).is_file() for name in map(lambda p: p.rsplit("/", 1)[-1], paths.values()))
    table = top_table((out / "summary.md").read_text())
    ttft = [number(v) * (1e-3 if v.endswith("ms") else 1) for v in table["TTFT"]]
    assert len(ttft) == 2 and ttft == sorted(ttft)


@pytest.mark.parametrize("make, flags, fragment", [
    (None, [], "no such file"),
    ("table.txt", [], ".parquet or .csv"),
    ("nofeasible.csv", [], "no 'feasible' column"),
    ("infeasible.csv", [], "none of its"),
    ("study.csv", ["--heatmap", "batch,tp,latency_s"], "'latency_s' is not a column"),
    ("study.csv", ["--heatmap", "batch,colour,ttft_s"], "'colour' is not a column"),
    ("study.csv", ["--heatmap", "batch,tp,model"], "not numeric"),
    ("study.csv", ["--heatmap", "batch"], "X,Y,COLUMN"),
    ("study.csv", ["--objectives", "ttft"], "give two"),
    ("study.csv", ["--objectives", "speed:max,ttft"], "'speed' is not a numeric column"),
    ("study.csv", ["--top", "0"], "--top"),
])
def test_bad_inputs_give_one_line(tmp_path, capsys, make, flags, fragment):
    frame = pd.DataFrame({"model": "m", "hardware": "h100-sxm", "batch": [1, 2], "tp": [1, 2],
                          "feasible": [True, False], "reason": [None, "does not fit"],
                          "tpot_s": [0.01, 0.02], "ttft_s": [0.1, 0.2],
                          "throughput_tokens_per_s": [100.0, 150.0]})
    path = tmp_path / (make or "missing.parquet")
    if make == "table.txt":
        path.write_text("x")
    elif make == "nofeasible.csv":
        frame.drop(columns="feasible").to_csv(path, index=False)
    elif make == "infeasible.csv":
        frame.assign(feasible=False).to_csv(path, index=False)
    elif make:
        frame.to_csv(path, index=False)
    assert main(["report", str(path), "--out", str(tmp_path / "out"), *flags]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and fragment in message
    with pytest.raises(InferSimError):
        write_report(path, tmp_path / "out2", objectives=flags[1] if flags[:1] == ["--objectives"] else None,
                     heatmap=flags[1] if flags[:1] == ["--heatmap"] else None,
                     top=int(flags[1]) if flags[:1] == ["--top"] else 5)


def test_a_study_frame_works_as_well_as_a_file(study, tmp_path):
    _, frame = study
    paths = write_report(frame[frame.tp == 1], tmp_path, heatmap="batch,input_len,ttft_s", top=2)
    table = top_table(paths["summary"].read_text())
    assert len(table) == 2 and set(table["hardware"]) == {"dgx-a100", "dgx-h100"}
    assert np.isfinite(pd.read_csv(paths["front"])["throughput_per_device"]).all()
