"""Bad input gets one line naming the file and field, exit code 2, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from simulator.cli import main
from simulator.specs.loader import read_yaml, shipped_devices

GOOD_DEVICE = read_yaml(shipped_devices()["h100-sxm"])


def write_device(tmp_path: Path, **changes) -> Path:
    data = {**GOOD_DEVICE, **changes}
    path = tmp_path / "device.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip()


def estimate_args(hardware, model="llama-2-7b"):
    return ["estimate", "--model", str(model), "--hardware", str(hardware), "--json"]


@pytest.mark.parametrize(
    ("changes", "field", "fragment"),
    [
        ({"memory": [{"name": "hbm", "capacity": "80 GB", "bandwidth": "3.35 TB", "latency": "1 us"}]},
         "memory.0.bandwidth", "unknown bandwidth unit"),
        ({"memory": [{"name": "hbm", "capacity": "-80 GB", "bandwidth": "3 TB/s"}]},
         "memory.0.capacity", "must be positive"),
        ({"compute": {"bf16": "312"}}, "compute.bf16", "has no unit"),
        ({"compute": {"bf17": "312 TFLOPS"}}, "compute.bf17", "Input should be"),
        ({"power": {"idle": "50 W"}}, "power.max", "required field is missing"),
        ({"power": {"idle": "500 W", "max": "400 W"}}, "power", "must exceed idle"),
        ({"memory_bandwidth": "3 TB/s"}, "memory_bandwidth", "unknown field"),
        ({"efficiency": {"compute": 1.5}}, "efficiency.compute", "fraction"),
        ({"efficiency": {"compute": [[1e9, 0.5], [1e6, 0.2]]}}, "efficiency.compute", "increasing"),
    ],
)
def test_invalid_device_fields_are_named(tmp_path, capsys, changes, field, fragment):
    path = write_device(tmp_path, **changes)
    code, err = run_cli(estimate_args(path), capsys)
    assert code == 2
    assert len(err.splitlines()) == 1
    assert str(path) in err and field in err and fragment in err


def test_missing_field_is_named(tmp_path, capsys):
    data = dict(GOOD_DEVICE)
    del data["compute"]
    path = tmp_path / "nocompute.yaml"
    path.write_text(yaml.safe_dump(data))
    code, err = run_cli(estimate_args(path), capsys)
    assert code == 2 and "compute: required field is missing" in err


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ncompute: {bf16: 1 TFLOPS\nmemory: []\n")
    code, err = run_cli(estimate_args(path), capsys)
    assert code == 2 and str(path) in err and "malformed YAML" in err and "line" in err


def test_unknown_names_suggest_close_matches(capsys):
    code, err = run_cli(estimate_args("h100-sxn"), capsys)
    assert code == 2 and "unknown hardware name" in err and "h100-sxm" in err
    code, err = run_cli(estimate_args("h100-sxm", model="llama-2-7"), capsys)
    assert code == 2 and "unknown models name" in err and "llama-2-7b" in err


def test_missing_file(capsys):
    code, err = run_cli(estimate_args("/nonexistent/gpu.yaml"), capsys)
    assert code == 2 and "no such hardware file" in err


def test_bad_model_yaml(tmp_path, capsys):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bad", "architecture": "LlamaForCausalLM", "num_layers": 2, "hidden_size": 64,
        "num_attention_heads": 6, "num_kv_heads": 4, "ffn": {"intermediate_size": 128},
        "vocab_size": 100,
    }))
    code, err = run_cli(estimate_args("h100-sxm", model=path), capsys)
    assert code == 2 and "not a multiple of num_kv_heads" in err


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [("--batch", "0", "batch must be a positive integer"),
     ("--input-len", "-5", "input_len must be a positive integer")],
)
def test_bad_request_values(capsys, flag, value, fragment):
    code, err = run_cli(estimate_args("h100-sxm") + [flag, value], capsys)
    assert code == 2 and fragment in err


def test_unknown_dtype_choice_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(estimate_args("h100-sxm") + ["--weight-dtype", "int3"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_device_without_a_usable_dtype(tmp_path, capsys):
    path = write_device(tmp_path, compute={"int8": "100 TOPS"})
    code, err = run_cli(estimate_args(path), capsys)
    assert code == 2 and "no compute rate for bf16" in err


def test_no_traceback_from_the_command_line(tmp_path):
    path = write_device(tmp_path, compute={"bf16": "fast"})
    proc = subprocess.run(
        [sys.executable, "-m", "simulator", *estimate_args(path)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("infersim: error:") and len(proc.stderr.strip().splitlines()) == 1
