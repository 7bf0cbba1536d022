"""Op graph of one inference step of a decoder-only transformer.

A step processes ``batch`` sequences, each with ``new_tokens`` new tokens
attending to ``context`` cached-plus-new tokens: prefill is
``new_tokens == context == prompt length``; decode is ``new_tokens == 1`` with
the context grown so far. Layers of the same kind are one op with ``count``
set, so a step is a few dozen ops whatever the depth. Equations are in
``docs/model.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np

from simulator.dtypes import bytes_per_value
from simulator.graph.ops import Op, Quantity, elementwise, gemm
from simulator.specs.model import ModelSpec

Phase = Literal["prefill", "decode"]
AttentionImpl = Literal["flash", "naive"]
QUANTIZE_PASSES = 12
"""Elementwise kernels of an eager KIVI quantization of K or V, packing aside (``_kv_quantize``)."""


@dataclass(frozen=True)
class Precision:
    """Storage dtypes of weights, KV cache and activations, and the matrix units' dtype."""

    weight: str = "bf16"
    kv: str = "bf16"
    act: str = "bf16"
    compute: str = "bf16"
    group_size: int = 128
    kv_residual: int = 0
    """KIVI: the most recent tokens kept in the activation dtype, the rest in ``kv``."""
    kv_store: str = "kv"
    """``"kv"``: cache K and V; ``"x"``: cache each layer's normed input and recompute K and V
    from it every decode step (XQuant)."""
    weight_dequant: str = "fused"
    """Integer weights: ``"fused"``, dequantized in the GEMM's registers (Marlin, AWQ kernels);
    ``"separate"``, dequantized by a kernel of their own into an activation-dtype copy that the
    GEMM then reads (FlexGen, eager frameworks)."""

    @property
    def weight_bytes(self) -> float:
        return bytes_per_value(self.weight, self.group_size)

    @property
    def kv_bytes(self) -> float:
        return bytes_per_value(self.kv, self.group_size)

    @property
    def act_bytes(self) -> float:
        return bytes_per_value(self.act)


@dataclass(frozen=True)
class StepShape:
    phase: Phase
    batch: int
    new_tokens: int
    context: Quantity
    logits: int = 1
    """Positions per sequence projected onto the vocabulary: the last one, or every drafted
    token when a speculative step verifies ``new_tokens`` at once."""

    @property
    def tokens(self) -> int:
        return self.batch * self.new_tokens

    def attended_pairs(self, causal_skip: bool = True, window: int | None = None) -> Quantity:
        """Query-key pairs scored per sequence and head.

        The new tokens sit at the end of the context; with causal skipping the
        i-th new token sees ``context - new_tokens + i`` keys, at most ``window``.
        Without it (naive attention) every new token scores the whole context.
        """
        n, c = self.new_tokens, self.context
        if not causal_skip:
            return n * c
        pairs = n * c - n * (n - 1) / 2.0
        if window is not None:
            # Keys beyond the window: query j (1..c) sees min(j, w) keys; subtract the excess.
            first = c - n  # queries c-n+1 .. c
            excess = lambda q: np.where(q > window, (q - window) * (q - window + 1) / 2.0, 0.0)  # noqa: E731
            pairs = pairs - (excess(c) - excess(first))
        return pairs


@dataclass(frozen=True)
class ExpertShard:
    """Expert parallelism: the device holds ``experts / devices`` of the model's experts and
    receives the routed rows of ``group_tokens`` tokens (its expert-parallel group's), the
    busiest device ``imbalance`` times the mean."""

    experts: int
    devices: int
    group_tokens: Quantity
    imbalance: float = 1.0

    @property
    def local_experts(self) -> int:
        return self.experts // self.devices

    def rows_for(self, top_k: int) -> Quantity:
        """Routed token-rows the busiest device computes."""
        return self.group_tokens * top_k / self.devices * self.imbalance


class _Builder:
    """Holds the shape and precision while the per-block builders append ops."""

    def __init__(self, model: ModelSpec, step: StepShape, precision: Precision, attention: AttentionImpl,
                 experts: ExpertShard | None = None):
        self.experts = experts
        self.m = model
        self.step = step
        self.p = precision
        self.attention = attention
        self.ops: list[Op] = []
        self.T = step.tokens
        self.a = precision.act_bytes
        self.w = precision.weight_bytes

    def gemm(self, name: str, m: Quantity, n: float, k: float, count: int, **kw) -> None:
        wbytes = kw.pop("wbytes", self.w)
        if self.p.weight_dequant == "separate" and wbytes == self.w and self.p.weight.startswith("int"):
            # A kernel of its own reads the packed weights and writes them in the activation
            # dtype (codes x scale + shift); the GEMM reads that copy, a transient buffer.
            values = kw.get("weight_values", n * k)
            self.ops.append(Op(
                name=f"{name}_dequantize", kind="dequantize", flops=2.0 * values,
                read_bytes=values * self.w, write_bytes=values * self.a, weight_bytes=values * self.w,
                dtype=self.p.act, count=count))
            op = gemm(name, m, n, k, weight_bytes_per_value=self.a, act_bytes=self.a, dtype=self.p.compute,
                      count=count, **kw)
            self.ops.append(dataclasses.replace(op, weight_bytes=0.0))
            return
        self.ops.append(
            gemm(
                name, m, n, k, weight_bytes_per_value=wbytes, act_bytes=self.a,
                dtype=self.p.compute, count=count, **kw,
            )
        )

    def vector(self, name: str, elements_in: Quantity, elements_out: Quantity, flops_per: float,
               count: int, kind="elementwise", weight_values: float = 0.0, groups: Quantity = 1.0) -> None:
        """An elementwise op; ``groups``: the experts it runs over, one kernel each where the
        runtime loops over experts (``DeviceEfficiency.expert_loop``)."""
        op = elementwise(name, elements_in, elements_out, flops_per, act_bytes=self.a, dtype=self.p.act,
                         count=count, kind=kind, weight_bytes=weight_values * self.a)
        grouped = not (isinstance(groups, float) and groups == 1.0)
        self.ops.append(dataclasses.replace(op, groups=groups) if grouped else op)

    def norm(self, name: str, width: int, count: int, tokens: Quantity | None = None) -> None:
        rows = self.T if tokens is None else tokens
        # RMSNorm: square, sum, scale, multiply by weight (~4 FLOPs per element); LayerNorm ~7.
        per = 4.0 if self.m.norm == "rmsnorm" else 7.0
        self.vector(name, rows * width, rows * width, per, count, kind="norm", weight_values=width)

    # --- embedding and head ----------------------------------------------------------

    def embedding(self) -> None:
        h = self.m.hidden_size
        self.ops.append(Op(
            name="embedding", kind="embedding", flops=0.0,
            read_bytes=self.T * h * self.a + self.T * 4, write_bytes=self.T * h * self.a,
            weight_bytes=self.T * h * self.a, dtype=self.p.act,
        ))
        if self.m.position_encoding == "learned":
            self.vector("position_embedding", 2 * self.T * h, self.T * h, 1.0, 1)

    def head(self) -> None:
        # Only the last position of each sequence is projected onto the vocabulary (all drafted
        # positions when verifying a speculation).
        b, h, v = self.step.batch * self.step.logits, self.m.hidden_size, self.m.vocab_size
        self.norm("final_norm", h, 1, tokens=b)
        self.gemm("lm_head", b, v, h, 1, wbytes=self.a)
        if self.m.tie_word_embeddings:  # the embedding table, stored [vocab, hidden]
            self.ops[-1] = dataclasses.replace(self.ops[-1], transposed_weight=True)
        # Sampling: softmax over the logits as the LM head wrote them (upcast in registers),
        # then top-k/top-p selection (~5 FLOPs per logit).
        self.ops.append(Op(
            name="sampling", kind="sampling", flops=5.0 * b * v, read_bytes=b * v * self.a,
            write_bytes=b * 4.0, dtype="fp32",
        ))

    # --- attention -------------------------------------------------------------------

    def attention_block(self) -> None:
        m, L, h = self.m, self.m.num_layers, self.m.hidden_size
        self.norm("input_norm", h, L)
        if m.mla is not None:
            self._mla(L)
        else:
            self._gqa(L)
        self.vector("residual_add", 2 * self.T * h, self.T * h, 1.0, L)

    def _gqa(self, L: int) -> None:
        m, T, d = self.m, self.T, self.m.head_size
        H, KV = m.num_attention_heads, m.kv_heads
        self.gemm("qkv_proj", T, (H + 2 * KV) * d, m.hidden_size, L)
        if m.qk_norm:
            self.vector("qk_norm", T * (H + KV) * d, T * (H + KV) * d, 4.0, L, kind="norm")
        if m.position_encoding == "rope":
            self.vector("rope", T * (H + KV) * d, T * (H + KV) * d, 3.0, L, kind="rope")
        if self.p.kv_store == "x":
            self._xquant(L, H, KV, d)
        else:
            self._kv_write(2 * KV * d, L)
            self._kv_quantize(KV * d, L)
            self._attention_core(L, heads=H, qk_dim=d, v_dim=d, kv_width=2 * KV * d)
        self.gemm("o_proj", T, m.hidden_size, H * d, L)

    def _xquant(self, L: int, H: int, KV: int, d: int) -> None:
        """XQuant: the cache holds each token's normed layer input ``X`` (``hidden`` values in the
        KV dtype); a decode step re-reads ``X`` for the attended context and recomputes K and V
        (``X W_k``, ``X W_v``, RoPE on K) before attending. Prefill uses the K and V it just made."""
        h, step = self.m.hidden_size, self.step
        self._kv_write(h, L)
        if step.phase == "prefill":
            self._attention_core(L, heads=H, qk_dim=d, v_dim=d, kv_width=2 * KV * d, materialised=True)
            return
        window = self.m.sliding_window
        keys = step.context if window is None else np.minimum(step.context, window)
        rows = step.batch * keys
        recompute = gemm("kv_recompute", rows, 2 * KV * d, h, weight_bytes_per_value=self.w,
                         act_bytes=self.a, dtype=self.p.compute, count=L)
        x_bytes = rows * h * self.p.kv_bytes
        self.ops.append(dataclasses.replace(
            recompute, read_bytes=recompute.weight_bytes + x_bytes, kv_read_bytes=x_bytes))
        if self.m.position_encoding == "rope":
            self.vector("kv_recompute_rope", rows * KV * d, rows * KV * d, 3.0, L, kind="rope")
        self._attention_core(L, heads=H, qk_dim=d, v_dim=d, kv_width=2 * KV * d, materialised=True)

    def _mla(self, L: int) -> None:
        m, T, h, H = self.m, self.T, self.m.hidden_size, self.m.num_attention_heads
        mla = m.mla
        assert mla is not None
        q_head = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank:
            self.gemm("q_down_proj", T, mla.q_lora_rank, h, L)
            self.norm("q_norm", mla.q_lora_rank, L)
            self.gemm("q_up_proj", T, H * q_head, mla.q_lora_rank, L)
        else:
            self.gemm("q_proj", T, H * q_head, h, L)
        latent = mla.kv_lora_rank + mla.qk_rope_head_dim
        self.gemm("kv_down_proj", T, latent, h, L)
        self.norm("kv_norm", mla.kv_lora_rank, L)
        self.vector("rope", T * (H + 1) * mla.qk_rope_head_dim, T * (H + 1) * mla.qk_rope_head_dim,
                    3.0, L, kind="rope")
        self._kv_write(latent, L)
        up_width = H * (mla.qk_nope_head_dim + mla.v_head_dim)
        if self.step.phase == "prefill":
            # Materialise per-head K and V from the latent for every context token.
            ctx_tokens = self.step.batch * self.step.context
            self.gemm("kv_up_proj", ctx_tokens, up_width, mla.kv_lora_rank, L)
            self._attention_core(L, heads=H, qk_dim=q_head, v_dim=mla.v_head_dim,
                                 kv_width=H * (q_head + mla.v_head_dim), materialised=True)
        else:
            # Decode absorbs the up-projections into the query and output (DeepSeek-V2 §2.1.2):
            # attention runs over the cached latent, shared by all heads like MQA.
            # One small GEMM per head (a batched GEMM): m = tokens x heads rows in all.
            self.gemm("q_absorb", T * H, mla.kv_lora_rank, mla.qk_nope_head_dim, L,
                      weight_values=H * mla.qk_nope_head_dim * mla.kv_lora_rank)
            self._attention_core(L, heads=H, qk_dim=latent, v_dim=mla.kv_lora_rank,
                                 kv_width=latent, shared_kv=True)
            self.gemm("out_absorb", T * H, mla.v_head_dim, mla.kv_lora_rank, L,
                      weight_values=H * mla.kv_lora_rank * mla.v_head_dim)
        self.gemm("o_proj", T, h, H * mla.v_head_dim, L)

    def _kv_write(self, width: int, L: int) -> None:
        kv = self.T * width * self.p.kv_bytes
        read = self.T * width * self.a
        if self.p.kv_residual:
            # KIVI: a new token lands in the full-precision residual; each token leaving it is
            # read back and quantized once, so per token: one full write, one read, one packed write.
            kv, read = kv + self.T * width * self.a, 2.0 * read
        self.ops.append(Op(
            name="kv_cache_write", kind="cache_write", flops=self.T * width * 1.0,
            read_bytes=read, write_bytes=kv, kv_write_bytes=kv,
            dtype=self.p.act, count=L,
        ))

    def _kv_quantize(self, width: int, L: int) -> None:
        """KIVI's quantization of the tokens entering the codes, as an eager framework runs it.

        A fused kernel quantizes as it writes the cache (``kv_cache_write`` prices that); eager
        attention (``attention="naive"``, the executor) runs the math as a chain of elementwise
        kernels for K and for V of ``width`` values a token: minimum, maximum, range, scale,
        shift, divide, round, clip and cast, then the codes, scales and minima stored
        (``QUANTIZE_PASSES``), and sub-byte codes packed (a copy, then a shift and an OR for each
        further code in a byte). Values are grouped per token; keys per channel over
        ``group_size`` tokens, so a decode step's key joins a partly filled group and requantizes
        it: the group's ``held`` codes unpacked (sub-byte), scaled, shifted and joined to the new
        key first (``validation.executor.kv``; KIVI itself waits for a whole group in the
        residual). Decode quantizes one token a sequence (the one leaving the residual); prefill
        the prompt beyond the residual, groups filled from empty. Each pass reads and writes its
        values in the activation dtype.
        """
        if self.attention != "naive" or self.p.kv_bytes >= self.a:
            return
        step, g = self.step, self.p.group_size
        per = max(1, round(1.0 / self.p.kv_bytes)) if self.p.kv_bytes < 1.0 else 1
        pack = 0 if per == 1 else 1 + 2 * (per - 1)
        residual = self.p.kv_residual
        if step.phase == "prefill":
            tokens: Quantity = np.maximum(step.new_tokens - residual, 0) * step.batch
            held: Quantity = 0.0
            requant = 0
        else:
            # One token a sequence enters the codes (steady state: the first `residual` steps of a
            # sequence, which quantize nothing, are not told apart).
            quantized = np.maximum(step.context - residual, 1)  # codes after this step
            tokens = step.batch * step.new_tokens
            held = np.mod(quantized - 1, g)  # codes in the group the key joins
            requant = (2 * per if per > 1 else 0) + 3
        quantize = QUANTIZE_PASSES + pack
        passes = 2 * quantize + requant
        # V's passes cover the tokens; K's (and its group's requantization) the group too.
        values = (tokens * width * quantize + tokens * (held + 1) * width * quantize
                  + tokens * (held + 1) * width * requant)
        self.ops.append(Op(
            name="kv_quantize", kind="elementwise", flops=values / passes,
            read_bytes=values * self.a / passes, write_bytes=values * self.a / passes,
            dtype=self.p.act, count=L * passes))

    def _attention_core(self, L: int, heads: int, qk_dim: int, v_dim: int, kv_width: int,
                        materialised: bool = False, shared_kv: bool = False) -> None:
        """Scores, softmax and weighted values for all heads of one layer.

        FlashAttention is one kernel: it reads Q and the K/V it needs once and
        writes O. Naive attention is three, as eager frameworks run it: the
        scores ``Q K^T`` are written out, a softmax reads and rewrites them,
        and ``P V`` reads them again; no causal skipping. K/V come from the
        cache (``kv_width`` values per token in the KV dtype; half of them K,
        half V, unless ``shared_kv``: MLA's latent is both), or,
        ``materialised``, from activations just computed (MLA prefill). With
        a sliding window the new tokens together need the last
        ``window + new_tokens - 1`` keys.
        """
        b, step, window = self.step.batch, self.step, self.m.sliding_window
        flash = self.attention == "flash"
        pairs = step.attended_pairs(causal_skip=flash, window=window) * b * heads
        keys = step.context if window is None else np.minimum(step.context, window + step.new_tokens - 1)
        if materialised:
            kv_bytes = b * keys * kv_width * self.a
        else:
            recent = np.minimum(keys, self.p.kv_residual)  # KIVI's full-precision window
            kv_bytes = b * kv_width * ((keys - recent) * self.p.kv_bytes + recent * self.a)
        kv_read = 0.0 if materialised else kv_bytes
        if not flash and not materialised and self.p.kv_bytes < self.a:
            # Eager attention cannot read a quantized cache: the attended K/V are dequantized into
            # the activation dtype first, as an eager framework does it: sub-byte codes unpacked
            # to bytes (for each of the 8/bits codes in a byte, a shift and a mask, each pass
            # writing every 8/bits-th byte, for K and for V), then scaled (codes x scale) and
            # shifted (+ minimum) in two passes. FlashAttention-style kernels dequantize in
            # registers, inside the attention kernel.
            # Prefill attends its own tokens as computed (they are quantized after it); only the
            # cached context before them, outside the residual, is dequantized.
            fresh = step.new_tokens if step.phase == "prefill" else 0
            values = b * kv_width * np.maximum(keys - np.maximum(recent, fresh), 0)
            packed = values * self.p.kv_bytes
            # (A prompt without cached context keeps the ops, empty: the serving engine needs the
            # same ops in every chunk; each costs its floor.)
            if self.p.kv_bytes < 1.0:
                per = max(1, round(1.0 / self.p.kv_bytes))  # codes per byte (scales aside)
                passes = 2 * 2 * per  # K and V, a shift and a mask per code
                self.ops.append(Op(
                    name="kv_unpack", kind="unpack", flops=2.0 * values / passes,
                    read_bytes=2.0 * values / passes, write_bytes=2.0 * values / passes,
                    kv_read_bytes=packed / passes, dtype=self.p.act, count=L * passes))
            self.ops.append(Op(
                name="kv_dequantize", kind="dequantize", flops=2.0 * values,
                read_bytes=values * (1.0 + self.a), write_bytes=2.0 * values * self.a,
                kv_read_bytes=packed if self.p.kv_bytes >= 1.0 else 0.0, dtype=self.p.act, count=L))
            kv_bytes, kv_read = b * keys * kv_width * self.a, 0.0
        q_bytes = self.T * heads * qk_dim * self.a
        out_bytes = self.T * heads * v_dim * self.a
        if flash:
            self.ops.append(Op(
                name="attention", kind="attention", unit="matrix",
                flops=2.0 * pairs * (qk_dim + v_dim) + 5.0 * pairs, read_bytes=q_bytes + kv_bytes,
                write_bytes=out_bytes, kv_read_bytes=kv_read, dtype=self.p.act, count=L,
            ))
            return
        share = 1.0 if shared_kv else 0.5
        scores = pairs * self.a
        self.ops.append(Op(
            name="attention_scores", kind="attention", unit="matrix", flops=2.0 * pairs * qk_dim,
            read_bytes=q_bytes + share * kv_bytes, write_bytes=scores, kv_read_bytes=share * kv_read,
            dtype=self.p.act, count=L,
        ))
        self.ops.append(Op(
            name="attention_softmax", kind="softmax", flops=5.0 * pairs, read_bytes=scores,
            write_bytes=scores, dtype=self.p.act, count=L,
        ))
        self.ops.append(Op(
            name="attention_values", kind="attention", unit="matrix", flops=2.0 * pairs * v_dim,
            read_bytes=scores + share * kv_bytes, write_bytes=out_bytes, kv_read_bytes=share * kv_read,
            dtype=self.p.act, count=L,
        ))

    # --- feed-forward ----------------------------------------------------------------

    def dense_ffn(self, count: int) -> None:
        if count == 0:
            return
        h = self.m.hidden_size
        self.norm("post_attention_norm", h, count)
        self._mlp("mlp", self.T, self.m.ffn.intermediate_size, count)
        self.vector("residual_add", 2 * self.T * h, self.T * h, 1.0, count)

    def _mlp(self, prefix: str, tokens: Quantity, inter: int, count: int,
             experts: Quantity | None = None, single: Quantity = 0.0) -> None:
        """Up (gate+up fused when gated), activation, down; ``experts`` distinct weight sets,
        ``single`` of them multiplying one row."""
        h, gated = self.m.hidden_size, self.m.ffn.gated
        up = (2 if gated else 1) * inter
        sets = 1.0 if experts is None else experts
        self.gemm(f"{prefix}_up_proj", tokens, up, h, count, weight_values=sets * up * h, groups=sets,
                  single_groups=single)
        act_flops = 5.0 if gated else 4.0  # SiLU/GELU plus the gating multiply
        self.vector(f"{prefix}_act", tokens * up, tokens * inter, act_flops, count, kind="activation",
                    groups=sets)
        self.gemm(f"{prefix}_down_proj", tokens, h, inter, count, weight_values=sets * inter * h,
                  groups=sets, single_groups=single)

    def moe_ffn(self, count: int) -> None:
        moe = self.m.moe
        if moe is None or count == 0:
            return
        h, T = self.m.hidden_size, self.T
        self.norm("post_attention_norm", h, count)
        routed = T * moe.top_k
        shard = self.experts
        if shard is None:
            experts = moe.num_experts
            touched = expected_experts_touched(moe.num_experts, moe.top_k, T)
            single = expected_single_token_experts(moe.num_experts, moe.top_k, T)
            rows = routed
        else:
            # Expert parallelism: this device's experts compute the rows the all-to-all brought,
            # each row for one of its local experts.
            experts, rows = shard.experts, shard.rows_for(moe.top_k)
            touched = expected_experts_touched(shard.local_experts, 1, rows)
            single = expected_single_token_experts(shard.local_experts, 1, rows)
        self.gemm("router", T, experts, h, count, wbytes=self.a)
        self.vector("topk_gate", T * experts, T * moe.top_k, 5.0, count, kind="routing")
        # Each expert's rows gathered into a contiguous block (a permute in a fused kernel).
        self.vector("experts_gather", rows * h, rows * h, 0.0, count, groups=touched)
        self._mlp("experts", rows, moe.expert_intermediate_size, count, experts=touched,
                  single=single)
        if moe.num_shared_experts:
            self._mlp("shared_experts", T, moe.shared_intermediate * moe.num_shared_experts, count)
        self.vector("expert_combine", routed * h, T * h, 2.0, count, groups=touched)
        self.vector("residual_add", 2 * T * h, T * h, 1.0, count)


def expected_experts_touched(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected distinct experts chosen by ``tokens`` tokens routing uniformly, top-k each.

    An expert escapes one token with probability ``1 - k/E``, so
    ``E[distinct] = E * (1 - (1 - k/E)^tokens)``.
    """
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def expected_single_token_experts(num_experts: int, top_k: int, tokens: float) -> float:
    """Expected experts chosen by exactly one of ``tokens`` tokens (uniform top-k routing):
    ``E * T * (k/E) * (1 - k/E)^(T-1)``."""
    p = top_k / num_experts
    return num_experts * tokens * p * (1.0 - p) ** (tokens - 1)


def build_step(
    model: ModelSpec,
    step: StepShape,
    precision: Precision = Precision(),
    attention: AttentionImpl = "flash",
    experts: ExpertShard | None = None,
) -> list[Op]:
    """Every op of one forward step, in execution order of one layer (layers folded into count).

    ``experts``: under expert parallelism, the device's share of the experts and the rows routed
    to it (``model`` is then the device's shape, holding its local experts)."""
    builder = _Builder(model, step, precision, attention, experts)
    builder.embedding()
    builder.attention_block()
    builder.dense_ffn(model.num_dense_layers)
    builder.moe_ffn(model.num_moe_layers)
    builder.head()
    return builder.ops


def decode_contexts(input_len: int, output_len: int, samples: int = 16) -> np.ndarray:
    """Context lengths at which to sample the decode step, one per equal bin of output positions.

    Decode step i (1..output_len-1) attends to ``input_len + i`` tokens; the
    midpoint of each bin stands for the bin. The mean over samples equals the
    mean over steps for a cost linear in context; a kink inside a bin (a
    sliding window filling up, a switch of roof) makes it approximate.
    """
    steps = output_len - 1
    bins = max(1, min(samples, steps))
    edges = np.linspace(1, steps + 1, bins + 1)
    return input_len + (edges[:-1] + edges[1:] - 1) / 2.0


def embedding_bytes(model: ModelSpec, precision: Precision) -> float:
    """Bytes of the input embedding and the LM head, kept in the activation dtype."""
    return (model.embedding_params() + model.lm_head_params()) * precision.act_bytes


def weight_bytes(model: ModelSpec, precision: Precision) -> float:
    """Bytes of all weights: layers in the weight dtype, embeddings and LM head in the activation dtype."""
    embed = model.embedding_params() + model.lm_head_params()
    return (model.params() - embed) * precision.weight_bytes + embedding_bytes(model, precision)


def held_tokens(model: ModelSpec, input_len: Quantity, output_len: Quantity) -> tuple[Quantity, Quantity]:
    """Tokens one sequence holds in its KV cache after its last step, as ``(prompt, generated)``.

    The last generated token is sampled, never fed back, so ``input_len + output_len - 1`` tokens
    were written; a window (``model.cached_tokens``) keeps the most recent, generated ones first.
    Parallel samples of one prompt share its ``prompt`` tokens and each hold their own
    ``generated`` ones: ``prompt + samples * generated`` per request (``docs/model.md``).
    """
    kept = model.cached_tokens(input_len + output_len - 1)
    generated = np.minimum(kept, output_len - 1)
    return kept - generated, generated


def kv_bytes_per_token(model: ModelSpec, kv_dtype: str, group_size: int = 128, store: str = "kv") -> float:
    """Cached bytes per token over all layers: K and V, or (XQuant, ``store="x"``) the layer input."""
    elements = model.hidden_size * model.num_layers if store == "x" else model.kv_elements_per_token()
    return elements * bytes_per_value(kv_dtype, group_size)
