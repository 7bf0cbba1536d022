"""The reference executor: a real small decoder-only transformer the simulator is checked against.

It reads the same ModelSpec as the simulator (dense or MoE, MHA/GQA; not MLA),
draws random weights from a seed, and runs batched greedy generation with a KV
cache on numpy (float32, CPU) or, optionally, PyTorch (CPU or CUDA)::

    from validation.executor import execute
    result = execute("tiny-dense-58m", batch=4, input_len=256, output_len=32)
    result.ttft_s, result.tpot_s, result.to_dict()

Modules: ``weights`` (random parameters), ``model`` (the forward step, written
once over a backend), ``numpy_backend`` / ``torch_backend`` (the ops),
``profiler`` (kernel timer), ``harness`` (generation and measurement),
``results`` (records and medians), ``machine`` (what it ran on), ``offload`` (layers on disk),
``kv`` (StreamingLLM and H2O eviction, KIVI quantization), ``experts`` (MoE experts on disk
behind a cache), ``parallel`` (TP, EP and PP in worker processes over shared memory), ``speculative`` (a draft
model's rounds verified by the target), ``serve`` (a real serving loop: requests arriving on the
wall clock, continuous or chunked batching over ragged steps), ``cli``.
"""

from validation.executor.harness import execute, generate, make_backend, prompt_tokens
from validation.executor.model import KVCache, Transformer
from validation.executor.results import ExecutionResult
from validation.executor.weights import init_weights

__all__ = [
    "ExecutionResult",
    "KVCache",
    "Transformer",
    "execute",
    "generate",
    "init_weights",
    "make_backend",
    "prompt_tokens",
]
