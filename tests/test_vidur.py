"""Predictions answer to real GPU timings: a sample of Vidur's operator and NCCL profiles.

Skipped with a message when ../shared/measurements/vidur is absent.
"""

from pathlib import Path

import numpy as np
import pytest

from simulator.specs.loader import load_device, load_system
from validation.vidur import main, predict_compute, predict_network, read_compute, read_network

PROFILES = Path(__file__).resolve().parents[2] / "shared" / "measurements" / "vidur"
pytestmark = pytest.mark.skipif(not PROFILES.is_dir(), reason=f"no Vidur profiles at {PROFILES}")


@pytest.fixture(scope="module")
def compute():
    frame = read_compute(PROFILES)
    sample = frame.sample(n=3000, random_state=0).reset_index(drop=True)
    return sample


def rel_errors(measured, predicted):
    return np.abs(predicted / measured - 1.0)


def test_gemm_and_elementwise_errors_are_not_grossly_off(compute):
    devices = {"a100": load_device("a100-80gb-sxm"), "h100": load_device("h100-sxm")}
    predicted = predict_compute(compute, lambda gpu, model: devices[gpu])
    errors = rel_errors(compute["measured_s"].to_numpy(), predicted)
    gemm = compute["op_class"].to_numpy() == "gemm"
    assert np.median(errors[gemm]) < 0.40
    assert np.median(errors[~gemm]) < 0.40


def test_collective_errors_are_not_grossly_off():
    network = read_network(PROFILES)
    sample = network.sample(n=1000, random_state=0).reset_index(drop=True)
    systems = {"a100_dgx": load_system("dgx-a100"), "h100_dgx": load_system("dgx-h100")}
    predicted = predict_network(sample, systems.__getitem__)
    assert np.median(rel_errors(sample["measured_s"].to_numpy(), predicted)) < 0.40


def test_a_broken_bandwidth_is_caught(compute):
    # Halving the memory bandwidth must show up as a gross error: the test can fail.
    def broken(gpu, model):
        device = load_device({"a100": "a100-80gb-sxm", "h100": "h100-sxm"}[gpu])
        tier = device.memory[0].model_copy(update={"bandwidth": device.memory[0].bandwidth / 4})
        return device.model_copy(update={"memory": (tier,)})

    predicted = predict_compute(compute, broken)
    assert np.median(rel_errors(compute["measured_s"].to_numpy(), predicted)) > 0.40


def test_command_line_report(tmp_path):
    out = tmp_path / "report.json"
    code = main(["--profiles", str(PROFILES), "--json", str(out), "--max-median-error", "0.4"])
    assert code == 0
    import json

    report = json.loads(out.read_text())
    assert {"rows", "summary"} <= report.keys()
    row = next(r for r in report["rows"] if "op" in r)
    assert {"gpu", "model", "num_tokens", "tp", "op", "measured_s", "predicted_s", "rel_error"} <= row.keys()
    assert main(["--profiles", str(PROFILES), "--json", str(out), "--max-median-error", "0.001"]) == 1


def test_unknown_gpu_folder_needs_a_hardware_map(tmp_path, capsys):
    source = PROFILES / "compute" / "a100" / "meta-llama" / "Llama-2-7b-hf" / "mlp.csv"
    target = tmp_path / "compute" / "mi999" / "org" / "model"
    target.mkdir(parents=True)
    (target / "mlp.csv").write_text("\n".join(source.read_text().splitlines()[:20]) + "\n")
    code = main(["--profiles", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert code == 2 and "--hardware-map mi999=" in capsys.readouterr().err
    assert main(["--profiles", str(tmp_path), "--json", str(tmp_path / "r.json"),
                 "--hardware-map", "mi999=a100-80gb-sxm"]) == 0


def test_missing_columns_are_named(tmp_path, capsys):
    target = tmp_path / "compute" / "a100" / "org" / "model"
    target.mkdir(parents=True)
    (target / "mlp.csv").write_text("num_tokens,time_stats.add.median\n1,0.01\n")
    assert main(["--profiles", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 2
    assert "missing columns" in capsys.readouterr().err
