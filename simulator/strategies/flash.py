"""Flash-backed FFN weights (LLM in a flash, Alizadeh et al. 2024): only the active rows are read.

Attention, embedding and head weights stay in memory; each dense FFN layer's weights live on
the drive, stored row-column bundled (neuron ``i``'s up-projection row, its gate row when the
MLP is gated, and its down-projection column side by side: one read of ``(2 or 3) * h * bytes``).
A low-rank predictor (``h x r`` then ``r x I``) guesses which neurons a token activates; neurons
active for a recent token stay in memory (a sliding window), so a step reads only the newly
active ones.

Per step and layer, with ``a`` the share of neurons a token activates and ``T`` tokens in the
step (a batch of ``B`` decode tokens, or a prompt):

```
active  = 1 - (1 - a)^T                       neurons the step computes (union over its tokens)
new     = active * (1 - reuse)                neurons read from the drive
reads   = new * I,   bytes = reads * bundle
read_s  = reads * latency / queue_depth + bytes / read_bandwidth
```

``reuse`` is the share of a step's active neurons already in memory (none for a prompt). By
default it follows a token-independent activation model, ``1 - (1 - a)^(window T)`` of them
having been active in the last ``window`` steps; real activations correlate across tokens, so
that is pessimistic and ``reuse`` may be given. Reads of one layer start once its predictor has
run, so they do not hide under compute: a step is compute plus reads. The FFN GEMMs compute
``active`` of their rows, and the predictor adds two small GEMMs per layer. Memory: the FFN
weights are on the drive, and the window's neurons (``active * window`` of each layer, at most
all) in memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from simulator.errors import InferSimError
from simulator.graph.ops import Op, avg, gemm
from simulator.specs.hardware import System
from simulator.specs.model import ModelSpec

FFN_GEMMS = ("mlp_up_proj", "mlp_down_proj")
FFN_VECTOR = ("mlp_act",)


@dataclass(frozen=True)
class FlashPlan:
    active: float = 0.05
    """Share of FFN neurons one token activates (OPT's ReLU FFNs: 3-5%)."""
    window: int = 5
    """Steps whose active neurons stay in memory."""
    reuse: float | None = None
    """Share of a step's active neurons already in memory; ``None``: token-independent model."""
    predictor_rank: int = 128
    queue_depth: int = 32
    """Reads in flight at once (LLM in a flash reads with 32 threads)."""
    bundle: bool = True
    """Store each neuron's up row and down column together (one read), else two reads."""

    def __post_init__(self) -> None:
        if not 0.0 < self.active <= 1.0:
            raise InferSimError(f"--flash-active is the share of FFN neurons a token activates, in (0, 1]; "
                                f"got {self.active}")
        if self.window < 0 or self.predictor_rank < 1 or self.queue_depth < 1:
            raise InferSimError("--flash-window must be >= 0, the predictor rank and queue depth >= 1")
        if self.reuse is not None and not 0.0 <= self.reuse <= 1.0:
            raise InferSimError(f"--flash-reuse must be a share from 0 to 1, got {self.reuse}")

    def active_share(self, tokens: float) -> float:
        return 1.0 - (1.0 - self.active) ** tokens

    def reuse_share(self, tokens: float) -> float:
        if self.reuse is not None:
            return self.reuse
        return 1.0 - (1.0 - self.active) ** (self.window * tokens)

    def check(self, model: ModelSpec, system: System) -> None:
        if model.moe is not None and model.num_dense_layers == 0:
            raise InferSimError(f"{model.name} has no dense FFN layers; flash-backed FFNs apply to dense "
                                "models (use --expert-cache for MoE experts)")
        if system.storage is None:
            raise InferSimError(f"system {system.name!r} has no storage to hold the FFN weights; add a "
                                "storage block (capacity, read_bandwidth, latency) to its YAML")

    def ffn_bytes(self, model: ModelSpec, weight_bytes: float) -> float:
        """Bytes of the dense FFN weights the drive holds."""
        return model.num_dense_layers * model.ffn_params(model.ffn.intermediate_size) * weight_bytes

    def apply(self, ops: list[Op], model: ModelSpec, tokens: float, weight_bytes: float,
              act_bytes: float, dtype: str) -> list[Op]:
        """The step's ops with the FFN computing only its active neurons, plus the predictor."""
        share = self.active_share(tokens)
        out = []
        for op in ops:
            if op.name in FFN_GEMMS:
                op = dataclasses.replace(
                    op, flops=op.flops * share, weight_bytes=op.weight_bytes * share,
                    read_bytes=op.read_bytes - op.weight_bytes * (1 - share))
            elif op.name in FFN_VECTOR:
                op = dataclasses.replace(op, flops=op.flops * share, read_bytes=op.read_bytes * share,
                                         write_bytes=op.write_bytes * share)
            out.append(op)
        layers, r, h, inter = model.num_dense_layers, self.predictor_rank, model.hidden_size, \
            model.ffn.intermediate_size
        out.append(gemm("flash_predictor_down", tokens, r, h, weight_bytes_per_value=weight_bytes,
                        act_bytes=act_bytes, dtype=dtype, count=layers))
        out.append(gemm("flash_predictor_up", tokens, inter, r, weight_bytes_per_value=weight_bytes,
                        act_bytes=act_bytes, dtype=dtype, count=layers))
        return out

    def read_s(self, model: ModelSpec, system: System, tokens: float, weight_bytes: float,
               cold: bool = False) -> dict[str, Any]:
        """Reads, bytes and seconds one step spends loading newly active neurons (``cold``: none
        in memory yet, as for a prompt)."""
        assert system.storage is not None
        inter, h = model.ffn.intermediate_size, model.hidden_size
        rows = 3 if model.ffn.gated else 2
        reused = 0.0 if cold else self.reuse_share(tokens)
        new = self.active_share(tokens) * (1.0 - reused) * inter * model.num_dense_layers
        reads = new * (1 if self.bundle else rows)
        nbytes = new * rows * h * weight_bytes
        storage = system.storage
        seconds = reads * storage.latency / self.queue_depth + nbytes / storage.read_bandwidth
        return {"reads": avg(reads), "bytes": avg(nbytes), "read_size": avg(nbytes / max(avg(reads), 1e-9)),
                "time_s": avg(seconds)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
