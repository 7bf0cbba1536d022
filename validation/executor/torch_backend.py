"""The same ops as ``numpy_backend`` in PyTorch, on CPU or CUDA (torch is optional).

Equations are documented once, on ``NumpyBackend``; this file follows them call
for call (explicit softmax attention, not SDPA) so that the two backends agree
to float32 rounding. Norms, softmax and the router's gates run in float32 even
when weights are 16-bit, as inference engines do. Import this module only
through ``load_torch_backend``, which says how to install torch if it is missing.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np

from simulator.errors import InferSimError, UnsupportedError
from validation.executor.model import KVCache
from validation.executor.numpy_backend import rope_angles

DTYPES = ("float32", "float16", "bfloat16")


def load_torch_backend(device: str = "cpu", dtype: str = "float32") -> TorchBackend:
    """A TorchBackend, or an InferSimError if torch is not importable."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InferSimError(
            "the torch backend needs PyTorch, which is not installed: `pip install torch`, "
            "or use --backend numpy"
        ) from None
    return TorchBackend(device, dtype)


class TorchBackend:
    name = "torch"

    def __init__(self, device: str = "cpu", dtype: str = "float32"):
        import torch
        import torch.nn.functional as functional

        if dtype not in DTYPES:
            raise UnsupportedError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UnsupportedError(f"device {device!r}: torch sees no CUDA device; use --device cpu")
        if not (device == "cpu" or device.startswith("cuda")):
            raise InferSimError(f"device {device!r} is not cpu or cuda[:N]")
        self.torch, self.F = torch, functional
        self.device, self.dtype = device, dtype
        self.tdtype = getattr(torch, dtype)
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else None

    # --- arrays ------------------------------------------------------------------------

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return self.torch.inference_mode()

    def from_numpy(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device, self.tdtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().float().cpu().numpy()

    def new_cache(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int) -> KVCache:
        shape = (batch, kv_heads, max_len, head_dim)
        zeros = self.torch.zeros
        return KVCache(
            k=[zeros(shape, dtype=self.tdtype, device=self.device) for _ in range(layers)],
            v=[zeros(shape, dtype=self.tdtype, device=self.device) for _ in range(layers)],
            max_len=max_len,
        )

    def synchronize(self) -> None:
        if self.sync is not None:
            self.sync()

    def _index(self, ids: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)

    # --- ops ---------------------------------------------------------------------------

    def embedding(self, table: Any, ids: np.ndarray) -> Any:
        return table.index_select(0, self._index(ids.reshape(-1)))

    def add_positions(self, x: Any, table: Any, positions: np.ndarray, batch: int) -> Any:
        x.view(batch, len(positions), -1).add_(table.index_select(0, self._index(positions)))
        return x

    def linear(self, x: Any, w: Any, b: Any | None) -> Any:
        return x @ w if b is None else self.torch.addmm(b, x, w)

    def rmsnorm(self, x: Any, w: Any, eps: float) -> Any:
        xf = x.float()
        y = xf * self.torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return y.to(x.dtype) * w

    def layernorm(self, x: Any, w: Any, b: Any | None, eps: float) -> Any:
        xf = x.float()
        centred = xf - xf.mean(-1, keepdim=True)
        y = (centred * self.torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w
        return y if b is None else y + b

    def rope_tables(self, max_len: int, head_dim: int, theta: float) -> tuple[Any, Any]:
        angles = rope_angles(max_len, head_dim, theta)
        return self.from_numpy(np.cos(angles)), self.from_numpy(np.sin(angles))

    def split_heads(self, qkv: Any, batch: int, heads: int, kv_heads: int,
                    head_dim: int) -> tuple[Any, Any, Any]:
        tokens = qkv.shape[0] // batch
        groups = heads // kv_heads
        qkv = qkv.view(batch, tokens, heads + 2 * kv_heads, head_dim)
        q = qkv[:, :, :heads].reshape(batch, tokens, kv_heads, groups, head_dim).permute(0, 2, 3, 1, 4)
        k = qkv[:, :, heads:heads + kv_heads].permute(0, 2, 1, 3)
        v = qkv[:, :, heads + kv_heads:].permute(0, 2, 1, 3)
        return q, k, v

    def qk_norm(self, q: Any, k: Any, wq: Any, wk: Any, eps: float) -> tuple[Any, Any]:
        return self.rmsnorm(q, wq, eps), self.rmsnorm(k, wk, eps)

    def rope(self, q: Any, k: Any, cos: Any, sin: Any) -> tuple[Any, Any]:
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: Any, cos: Any, sin: Any) -> Any:
        half = x.shape[-1] // 2
        rotated = self.torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def write_cache(self, cache_k: Any, cache_v: Any, k: Any, v: Any, start: int) -> None:
        end = start + k.shape[2]
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v

    def attention(self, q: Any, keys: Any, values: Any, q_start: int, k_start: int,
                  window: int | None) -> Any:
        batch, kv_heads, groups, tokens, head_dim = q.shape
        length = keys.shape[2]
        q_rows = q.reshape(batch, kv_heads, groups * tokens, head_dim)
        scores = (q_rows @ keys.transpose(-1, -2)).float() * (1.0 / math.sqrt(head_dim))
        q_pos = self.torch.arange(q_start, q_start + tokens, device=self.device)[:, None]
        k_pos = self.torch.arange(k_start, k_start + length, device=self.device)[None, :]
        hidden = k_pos > q_pos
        if window is not None:
            hidden |= q_pos - k_pos >= window
        scores = scores.view(batch, kv_heads, groups, tokens, length).masked_fill(hidden, -math.inf)
        probs = self.torch.softmax(scores, dim=-1).to(values.dtype)
        out = probs.view(batch, kv_heads, groups * tokens, length) @ values
        out = out.view(batch, kv_heads, groups, tokens, head_dim).permute(0, 3, 1, 2, 4)
        return out.reshape(batch * tokens, kv_heads * groups * head_dim)

    def activation(self, up: Any, kind: str, gated: bool) -> Any:
        if not gated:
            return self._act(up, kind)
        inter = up.shape[-1] // 2
        return self._act(up[:, :inter], kind) * up[:, inter:]

    def _act(self, x: Any, kind: str) -> Any:
        if kind == "silu":
            return self.F.silu(x)
        if kind in ("gelu", "gelu_tanh"):
            return self.F.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")
        if kind == "relu":
            return self.F.relu(x)
        raise UnsupportedError(f"activation {kind!r} is not implemented by the torch backend")

    def add_(self, x: Any, y: Any) -> Any:
        return x.add_(y)

    def route(self, logits: Any, top_k: int) -> tuple[Any, Any]:
        chosen, experts = self.torch.topk(logits.float(), top_k, dim=-1)
        return experts, self.torch.softmax(chosen, dim=-1)

    def group_by_expert(self, experts: Any, gates: Any, num_experts: int) -> list[tuple[Any, Any] | None]:
        top_k = experts.shape[1]
        flat = experts.reshape(-1)
        order = self.torch.argsort(flat, stable=True)
        counts = self.torch.bincount(flat, minlength=num_experts).tolist()  # one device -> host copy
        tokens = order // top_k
        flat_gates = gates.reshape(-1)[order]
        groups: list[tuple[Any, Any] | None] = []
        lo = 0
        for count in counts:
            groups.append((tokens[lo:lo + count], flat_gates[lo:lo + count]) if count else None)
            lo += count
        return groups

    def take_rows(self, x: Any, rows: Any) -> Any:
        return x.index_select(0, rows)

    def zeros_like(self, x: Any) -> Any:
        return self.torch.zeros_like(x)

    def scatter_add_rows(self, out: Any, rows: Any, y: Any, gates: Any) -> None:
        out.index_add_(0, rows, y * gates[:, None].to(y.dtype))

    def last_positions(self, x: Any, batch: int, count: int) -> Any:
        return x.view(batch, -1, x.shape[-1])[:, -count:].reshape(batch * count, -1)

    def select_rows(self, x: Any, rows: np.ndarray) -> Any:
        return x.index_select(0, self._index(rows))

    def concat_rows(self, parts: list[Any]) -> Any:
        return self.torch.cat(parts, dim=0)

    def argmax(self, logits: Any) -> np.ndarray:
        return logits.argmax(dim=-1).cpu().numpy()
