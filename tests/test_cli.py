"""The infersim command: JSON keys, tables, roofline image, list and info."""

import json

import pytest

from simulator.cli import main

ESTIMATE_KEYS = {"ttft_s", "tpot_s", "e2e_s", "throughput_tokens_per_s", "energy_j_per_token",
                 "memory_bytes", "prefill", "decode", "ops"}


def run_json(args, capsys):
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_json_has_the_documented_keys(capsys):
    out = run_json(["estimate", "--model", "llama-2-7b", "--hardware", "a100-80gb-sxm", "--batch", "1",
                    "--input-len", "512", "--output-len", "128"], capsys)
    assert ESTIMATE_KEYS <= out.keys()
    assert set(out["memory_bytes"]) == {"weights", "kv_cache", "activations", "total", "capacity"}
    assert out["prefill"]["bound"] in ("compute", "memory")
    assert out["decode"]["bound"] == "memory"
    assert out["e2e_s"] == pytest.approx(out["ttft_s"] + 127 * out["tpot_s"])
    assert out["throughput_tokens_per_s"] == pytest.approx(128 / out["e2e_s"])
    assert {"phase", "op", "flops", "bytes", "time_s", "bound"} <= out["ops"][0].keys()


def test_quantized_weights_and_kv_shrink_memory_and_decode_time(capsys):
    base = ["estimate", "--model", "llama-2-7b", "--hardware", "a100-80gb-sxm", "--batch", "8",
            "--input-len", "2048"]
    bf16 = run_json(base, capsys)
    quant = run_json([*base, "--weight-dtype", "int4", "--kv-dtype", "fp8"], capsys)
    assert quant["memory_bytes"]["weights"] < 0.3 * bf16["memory_bytes"]["weights"]
    assert quant["memory_bytes"]["kv_cache"] == pytest.approx(bf16["memory_bytes"]["kv_cache"] / 2)
    assert quant["tpot_s"] < 0.6 * bf16["tpot_s"]


def test_estimate_table(capsys):
    assert main(["estimate", "--model", "mixtral-8x7b", "--hardware", "h100-sxm", "--ops",
                 "--weight-dtype", "int4"]) == 0
    out = capsys.readouterr().out
    assert "TTFT" in out and "TPOT" in out and "experts_up_proj" in out


def test_plan_that_does_not_fit_says_by_how_much_and_what_fits(capsys):
    code = main(["estimate", "--model", "llama-2-70b", "--hardware", "a100-80gb-sxm"])
    err = capsys.readouterr().err
    assert code == 2
    assert "GB over" in err and "Would fit" in err and "--weight-dtype" in err and "devices" in err


def test_info_json(capsys):
    out = run_json(["info", "--model", "llama-2-70b", "--kv-dtype", "fp8"], capsys)
    assert out["params_total"] == pytest.approx(69.0e9, rel=0.01)
    assert out["kv_bytes_per_token"] == 80 * 2 * 8 * 128
    assert out["num_kv_heads"] == 8 and out["hidden_size"] == 8192


def test_info_reads_a_config_json(capsys, data_dir):
    path = data_dir / "hf_configs" / "llama-2-7b.json"
    if not path.exists():
        pytest.skip("fixture missing")
    out = run_json(["info", "--model", str(path)], capsys)
    assert out["params_total"] == pytest.approx(6.74e9, rel=0.01)


def test_list(capsys):
    models = run_json(["list", "models"], capsys)
    hardware = run_json(["list", "hardware"], capsys)
    assert {"llama-2-7b", "deepseek-v3", "opt-175b"} <= {m["name"] for m in models}
    names = {h["name"] for h in hardware}
    assert {"a100-80gb-sxm", "h100-sxm", "mi300x", "dgx-h100", "dgx-a100"} <= names
    assert main(["list", "hardware"]) == 0 and "h200-sxm" in capsys.readouterr().out


def test_roofline_writes_a_png(tmp_path, capsys):
    out = tmp_path / "roof.png"
    assert main(["roofline", "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_system_name_runs_on_its_device(capsys):
    out = run_json(["estimate", "--model", "llama-2-7b", "--hardware", "dgx-h100"], capsys)
    single = run_json(["estimate", "--model", "llama-2-7b", "--hardware", "h100-sxm"], capsys)
    assert out["tpot_s"] == pytest.approx(single["tpot_s"])
