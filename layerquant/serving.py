"""What an inference engine can serve: one definition, used both to constrain a bit plan
(solvers/allocation.py) and to list what a finished run cannot serve (report.py)."""
from __future__ import annotations

from layerquant.specs import QuantSpec

# vLLM's quantized kernels take 4/8-bit integer grids, per channel or in groups of 32/64/128
VLLM_BITS = (4, 8)
VLLM_GROUP_SIZES = (0, 32, 64, 128)


def vllm_servable(spec: QuantSpec) -> bool:
    return spec.method in ("gptq", "rtn") and spec.bits in VLLM_BITS and spec.group_size in VLLM_GROUP_SIZES


# vLLM's integer weight-activation schemes (compressed-tensors): W8A8 takes symmetric 8-bit
# weights per channel (or tensor); W4A8 ("CompressedTensorsW4A8Int") symmetric 4-bit weights per
# channel or group. Both need 8-bit, dynamic, per-token activations.
VLLM_INT_ACT_BITS = 8


def vllm_serves_with_int8_activations(spec: QuantSpec) -> bool:
    if spec.method not in ("gptq", "rtn") or not spec.sym:
        return False
    return (spec.bits == 8 and spec.group_size == 0) or (spec.bits == 4 and spec.group_size in VLLM_GROUP_SIZES)


def runtime_unservable(runtime: dict, layers: dict[str, QuantSpec], lowrank_rank: int = 0, act_clip: bool = False) -> list[str]:
    """What a run quantizes or transforms at run time that vLLM cannot run, or that no packed
    format can say, one sentence each (the report's `runtime_unservable`; the weight grids
    themselves are judged by `vllm_servable`). `runtime`: RuntimeQuant.identity() of the run;
    `layers`: full layer name -> spec."""
    out: list[str] = []
    act = runtime.get("act")
    if act:
        bits, group = act["bits"], act.get("group_size", 0)
        per = f"per group of {group} channels" if group else "per token"
        if bits < VLLM_INT_ACT_BITS:
            out.append(f"activations: {bits}-bit int, dynamic {per}: written as input_activations, but vLLM has no kernel for "
                       f"int activations below 8 bits (its 4-bit activations are NVFP4 floats), and compressed-tensors' own "
                       f"emulation scales by absmax / (2**{bits - 1} - 0.5) where the run used the signed full range "
                       f"(each token's extreme on -2**{bits - 1})")
        elif group:
            out.append(f"activations: 8-bit int {per}: vLLM's int8 activation kernels take one scale per token")
        else:
            others = [name for name, spec in layers.items() if not vllm_serves_with_int8_activations(spec)]
            if others:
                out.append(f"activations: 8-bit per token with {len(others)} layers whose weights vLLM's W8A8 / W4A8 int schemes "
                           f"do not take (they need symmetric 8-bit per-channel or 4-bit weights), e.g. {others[0]}")
        if act.get("clip_search"):
            out.append(f"activation clipping search ({bits}-bit): each token's scale chosen among {_ratios(act['clip_search'])} "
                       f"of its range for least rounding error; input_activations cannot say it, and a client quantizes each "
                       f"token over its full range")
        if act_clip:
            out.append("activation clipping ratios (trained, one per quantized input): input_activations have no place for "
                       "them; a client quantizes each token over its full range")
    kv = runtime.get("kv")
    if kv:
        out.append(f"KV cache: {kv['bits']}-bit int, asymmetric, dynamic per head and token: written as kv_cache_scheme, but "
                   f"vLLM's quantized KV caches are fp8 with static scales")
        if kv.get("clip_search"):
            out.append(f"KV cache clipping search: each entry's range chosen among {_ratios(kv['clip_search'])} of its min and max "
                       f"for least rounding error; kv_cache_scheme cannot say it")
        if kv.get("prompt_tokens"):
            out.append(f"float prompt cache (the first {kv['prompt_tokens']} tokens' keys and values computed by the float model "
                       f"and kept float): no packed format can say it; a client quantizes the whole cache")
    if "rotate" in runtime:
        out.append("rotation: the online Hadamard transforms (down_proj's input, the cached keys) have no place in the packed "
                   "formats; the run is written dequantized with the rotations undone (its weight-only function)")
    if lowrank_rank:
        out.append(f"low-rank corrections (rank {lowrank_rank}): no packed format can say them; the run is written dequantized "
                   f"with each correction folded into its weight")
    return out


def _ratios(ratios: list[float]) -> str:
    return f"{len(ratios)} ratios from {max(ratios)} to {min(ratios)}"
