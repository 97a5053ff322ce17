"""What an inference engine can serve: one definition, used both to constrain a bit plan
(solvers/allocation.py) and to list what a finished run cannot serve (report.py)."""
from __future__ import annotations

from layerquant.specs import QuantSpec

# vLLM's quantized kernels take 4/8-bit integer grids, per channel or in groups of 32/64/128
VLLM_BITS = (4, 8)
VLLM_GROUP_SIZES = (0, 32, 64, 128)


def vllm_servable(spec: QuantSpec) -> bool:
    return spec.method in ("gptq", "rtn") and spec.bits in VLLM_BITS and spec.group_size in VLLM_GROUP_SIZES
