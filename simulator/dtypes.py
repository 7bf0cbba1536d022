"""Storage sizes of weight, KV and activation dtypes, and the compute dtype they run in.

Integer formats are group-quantized: each group of ``group_size`` values
carries an fp16 scale and an fp16 zero point (AWQ/GPTQ-style), so int4 with
groups of 128 costs 0.5 + 4/128 = 0.53125 bytes per value.
"""

from __future__ import annotations

from simulator.errors import UnsupportedError

BITS = {
    "fp32": 32, "tf32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4, "int2": 2,
    "fp4": 4,
}
WEIGHT_DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8", "int4")
KV_DTYPES = ("fp32", "bf16", "fp16", "fp8", "int8", "int4", "int2")
ACT_DTYPES = ("fp32", "bf16", "fp16")
GROUP_SCALE_BYTES = 4.0  # fp16 scale + fp16 zero point per group
DEFAULT_GROUP_SIZE = 128


def bytes_per_value(dtype: str, group_size: int = DEFAULT_GROUP_SIZE) -> float:
    """Bytes per stored value, including the per-group scale of integer formats."""
    if dtype not in BITS:
        raise UnsupportedError(f"unknown dtype {dtype!r}; known: {', '.join(BITS)}")
    size = BITS[dtype] / 8
    if dtype.startswith("int"):
        size += GROUP_SCALE_BYTES / group_size
    return size


def check_choice(dtype: str, allowed: tuple[str, ...], what: str) -> str:
    if dtype not in allowed:
        raise UnsupportedError(f"{what} {dtype!r} is not supported; choose one of {', '.join(allowed)}")
    return dtype


def compute_dtype(weight_dtype: str, act_dtype: str, device_dtypes: set[str]) -> str:
    """The dtype the matrix units run in.

    fp8 weights run fp8 x fp8 where the device has fp8 units (W8A8, as TensorRT-LLM
    does on Hopper); every other quantized weight is dequantized to the activation
    dtype (weight-only quantization). A device without the activation dtype falls
    back to fp16, then bf16, then fp32.
    """
    if weight_dtype == "fp8" and "fp8" in device_dtypes:
        return "fp8"
    for candidate in (act_dtype, "fp16", "bf16", "fp32"):
        if candidate in device_dtypes:
            return candidate
    raise UnsupportedError(
        f"the device has no compute rate for {act_dtype} or a fallback; "
        f"it lists {', '.join(sorted(device_dtypes))}"
    )
