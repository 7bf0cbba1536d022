"""End-to-end estimates with datasheet efficiencies vs the fitted ones (docs/validation.md).

    python docs/e2e_shift.py
"""

from __future__ import annotations

import simulator
from simulator.specs.hardware import DeviceEfficiency
from simulator.specs.loader import load_device

CASES = [(1, 512, 128), (16, 512, 128)]


def main() -> None:
    model = simulator.load_model("llama-2-7b")
    print("| GPU | batch, in/out | TTFT datasheet -> fitted (ms) | TPOT datasheet -> fitted (ms) |"
          " implied decode bandwidth | prefill rate |")
    print("|---|---|---|---|---|---|")
    for name in ("a100-80gb-sxm", "h100-sxm"):
        fitted = load_device(name)
        datasheet = fitted.model_copy(update={"efficiency": DeviceEfficiency()})
        peak = fitted.compute["bf16"]
        bandwidth = fitted.main_memory.bandwidth
        for batch, prompt, out in CASES:
            before = simulator.estimate(model, datasheet, batch=batch, input_len=prompt, output_len=out)
            after = simulator.estimate(model, fitted, batch=batch, input_len=prompt, output_len=out)
            decode_bw = after.memory.weights / after.tpot_s
            prefill_rate = 2 * model.params() * batch * prompt / after.ttft_s
            print(f"| {name} | {batch}, {prompt}/{out} "
                  f"| {before.ttft_s * 1e3:.1f} -> {after.ttft_s * 1e3:.1f}"
                  f" | {before.tpot_s * 1e3:.2f} -> {after.tpot_s * 1e3:.2f}"
                  f" | {decode_bw / 1e12:.2f} of {bandwidth / 1e12:.2f} TB/s"
                  f" | {prefill_rate / 1e12:.0f} of {peak / 1e12:.0f} TFLOPS |")


if __name__ == "__main__":
    main()
