"""One GPTQModel case, run inside the GPTQModel virtual environment (never the project's).

Usage: python gptqmodel_case.py --model DIR --out DIR --method gptq --windows CALIB.safetensors [--bits B] [--group G]

--windows holds the calibration token windows layerquant uses ("tokens" [N, L] int64, the first
N x L tokens of the calibration text, BOS-prefixed); each window is one calibration sample with an
all-ones attention mask, so GPTQModel sees exactly the tokens layerquant and llm-compressor see.
  gptq   GPTQConfig(bits, group_size, sym=True) and GPTQModel's defaults for everything else (7.6.0:
         desc_act False, act_group_aware True (GAR, group-aware reordering), damp_percent 0.05 with
         auto increment 0.01, true_sequential, fallback RTN for modules that receive < 0.5% of the
         calibration tokens (MoE routing; never triggers on dense models), v1 "gptq" checkpoint
         format); embeddings and LM head stay float. The resolved config (GPTQModel's own
         quantize_config.json) is recorded in gptqmodel.json. A group size that does not divide the
         input columns is accepted (the last group is partial), so no per-layer override is needed.

GPTQModel writes a packed GPTQ checkpoint (one qweight/qzeros/scales/g_idx set per linear layer) to
a temporary folder next to OUT (with its disk offload, so nothing goes to /tmp); this script
dequantizes every quantized linear from those packed tensors, deletes the folder and writes OUT: a
plain float32 checkpoint (model.safetensors without quantization tensors, the original config.json
without quantization_config and with dtype float32, the tokenizer) and gptqmodel.json (version,
method, bits, per-layer group sizes and shapes, seconds, resolved config, the size of GPTQModel's
own packed file). layerquant's evaluator then measures it exactly as it measures layerquant's output.
Every linear except lm_head must come back quantized, else the script fails.

Caveats (GPTQModel 7.6.0 on CPU):
- GPTQMODEL_CPU_WORKERS: its CPU worker pool defaults to (cores + 1) // 2 workers, but the
  "model_loader:cpu" sub-pool asks for 2, so on a 2-core machine import is fine and quantize() fails
  ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"). The variable is
  raised to at least 2 before gptqmodel is imported (an explicit value is left alone).
- dtype: without dtype= GPTQModel loads a model on CPU as bfloat16, even an fp32 one; it is loaded
  in float32 here, like the other tools.
- Zero offset: the v1 ("gptq") format stores zero - 1 in qzeros, so w = scale[g] * (q - (qzeros + 1));
  "gptq_v2" stores the zero itself. Symmetric quantization makes every zero 2^(bits-1): checked.
- The first run on a machine also JIT-compiles GPTQModel's CPU packing extension (g++, ~30 s on 2
  cores; cached in ~/.cache/gptqmodel/torch_extensions), which that run's time includes.
- Loading the packed checkpoint back with GPTQModel (not done here) needs backend=BACKEND.TORCH on
  CPU for stories260K: AUTO picks an aten int4 kernel that requires out_features % 16 == 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path

# before gptqmodel (and torch) are imported: see the caveats above
if "GPTQMODEL_CPU_WORKERS" not in os.environ:
    os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, min(12, ((os.cpu_count() or 1) + 1) // 2)))
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import torch  # noqa: E402

PACKED = (".qweight", ".qzeros", ".scales", ".g_idx")


def unpack(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Codes packed little-endian into int32 words along `dim` (GPTQ layout: code j of a column
    occupies bits j*bits .. j*bits+bits-1 of the concatenated words, so 3-bit codes straddle words)."""
    words = (words.to(torch.int64) & 0xFFFFFFFF).movedim(dim, 0)  # unsigned 32-bit, packed dim first
    offsets = torch.arange(count, dtype=torch.int64) * bits
    index, shift = offsets // 32, (offsets % 32).view(-1, *[1] * (words.ndim - 1))
    low = words[index] >> shift
    nxt = torch.clamp(index + 1, max=words.shape[0] - 1)
    high = torch.where(shift + bits > 32, words[nxt] << (32 - shift), torch.zeros_like(low))
    return ((low | high) & ((1 << bits) - 1)).movedim(0, dim)


def dequantize(tensors: dict, name: str, bits: int, zero_offset: int) -> tuple[torch.Tensor, int, set]:
    """Plain [out, in] float32 weight of one packed linear; also its group count and its zeros."""
    qweight, qzeros, scales, g_idx = (tensors[name + suffix] for suffix in PACKED)
    columns, rows = g_idx.numel(), scales.shape[1]
    codes = unpack(qweight, bits, columns, 0)  # [in, out]
    zeros = unpack(qzeros, bits, rows, 1) + zero_offset  # [groups, out]
    groups = g_idx.long()
    weight = scales.float()[groups] * (codes.float() - zeros.float()[groups])
    return weight.t().contiguous(), scales.shape[0], set(zeros.unique().tolist())


def patch_3bit_packing(applied: list[str]) -> None:
    """Work around a GPTQModel 7.6.0 bug that kills 3-bit runs on layers whose in or out features are
    not multiples of 32 (stories260K's 172-wide MLP): its block packer refuses such a layer, and the
    pure-Python fallback (PackableQuantLinear.pack_original) packs 3-bit codes 32 at a time and indexes
    past the end ("IndexError: index 172 is out of bounds"), in a worker thread that then os._exit(1)s.
    Packing is lossless storage of codes GPTQModel has already chosen; this pads the layer to multiples
    of 32 (padded codes 0), lets the original packer run and trims scales, g_idx and qweight's columns
    back to the real layer; packed words stay whole 3-word blocks (32 codes), the layout GPTQModel's
    3-bit readers expect, with zero codes in the padding. The quantization itself is untouched.
    Every layer it is applied to is listed in gptqmodel.json ("patched_packing")."""
    import torch.nn.functional as F
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear

    original = PackableQuantLinear.pack_original

    def pack_original(self, linear, scales, zeros, g_idx=None):
        if self.bits != 3 or self.planar or not isinstance(linear, torch.nn.Linear):
            return original(self, linear, scales, zeros, g_idx)
        rows, cols = linear.weight.shape  # [out, in]
        pad_rows, pad_cols = -rows % 32, -cols % 32
        if not pad_rows and not pad_cols:
            return original(self, linear, scales, zeros, g_idx)
        g_idx = self.g_idx if g_idx is None else g_idx
        padded = torch.nn.Linear(cols + pad_cols, rows + pad_rows, bias=linear.bias is not None, device="cpu")
        with torch.no_grad():
            # -inf rounds to code 0 (clamped), so the unused bits of the last word stay clear
            padded.weight.copy_(F.pad(F.pad(linear.weight.data, (0, pad_cols), value=float("-inf")), (0, 0, 0, pad_rows)))
            if linear.bias is not None:
                padded.bias.copy_(F.pad(linear.bias.data, (0, pad_rows)))
        original(self, padded, F.pad(scales, (0, 0, 0, pad_rows), value=1.0), F.pad(zeros, (0, 0, 0, pad_rows)),
                 torch.cat([g_idx, g_idx[-1:].expand(pad_cols)]))
        self.qweight = self.qweight[:, :rows].contiguous()  # packed words stay whole 3-word blocks
        self.scales = self.scales[:, :rows].contiguous()
        self.g_idx = self.g_idx[:cols].contiguous()
        if getattr(self, "bias", None) is not None:
            self.bias = self.bias[:rows].contiguous()
        applied.append(f"{rows}x{cols}")

    PackableQuantLinear.pack_original = pack_original


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--method", required=True, choices=["gptq"])
    parser.add_argument("--windows", required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    args = parser.parse_args()
    started = time.perf_counter()
    if args.bits not in (2, 3, 4, 8):
        raise SystemExit(f"error: --bits {args.bits}: only 2, 3, 4 and 8 use the packing this script unpacks")

    from importlib.metadata import version

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from gptqmodel import GPTQConfig, GPTQModel

    torch.manual_seed(0)
    args.out = args.out.resolve()
    work = args.out.parent / f".{args.out.name}.gptqmodel-tmp"  # GPTQModel's packed output and disk offload
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args.model, args.windows = str(Path(args.model).resolve()), str(Path(args.windows).resolve())
    os.chdir(work)  # GPTQModel writes per-layer logs to ./logs: keep them in the scratch folder
    try:
        tokens = load_file(args.windows)["tokens"]
        samples = [{"input_ids": window.unsqueeze(0), "attention_mask": torch.ones(1, tokens.shape[1], dtype=torch.long)} for window in tokens]
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        patched: list[str] = []
        if args.bits == 3:
            patch_3bit_packing(patched)
        config = GPTQConfig(bits=args.bits, group_size=args.group, sym=True, offload_to_disk_path=str(work / "offload"))
        model = GPTQModel.load(args.model, config, device="cpu", dtype=torch.float32)
        linear = {n: tuple(m.weight.shape) for n, m in model.model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
        quantize_started = time.perf_counter()
        model.quantize(samples, batch_size=1, tokenizer=tokenizer)
        quantize_seconds = time.perf_counter() - quantize_started
        packed = work / "packed"
        model.save(str(packed))
        del model

        resolved = json.loads((packed / "quantize_config.json").read_text())
        checkpoint_format = resolved.get("format", resolved.get("checkpoint_format"))
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise SystemExit(f"error: GPTQModel saved format {checkpoint_format!r}; this script unpacks gptq (v1) and gptq_v2 only")
        if resolved.get("bits") != args.bits or not resolved.get("sym", False):
            raise SystemExit(f"error: GPTQModel resolved bits={resolved.get('bits')} sym={resolved.get('sym')}, asked {args.bits} / sym")
        zero_offset = 1 if checkpoint_format == "gptq" else 0
        files = sorted(packed.glob("*.safetensors"))
        tensors = {}
        for file in files:
            tensors.update(load_file(file))

        state, layer_groups, zeros_seen, unquantized = {}, {}, set(), []
        for name, (rows, cols) in linear.items():
            if name + ".qweight" not in tensors:
                unquantized.append(name)
                continue
            weight, groups, zeros = dequantize(tensors, name, args.bits, zero_offset)
            if tuple(weight.shape) != (rows, cols):
                raise SystemExit(f"error: {name} unpacks to {tuple(weight.shape)}, expected {(rows, cols)}")
            if groups != math.ceil(cols / args.group):
                raise SystemExit(f"error: {name} has {groups} groups, expected ceil({cols} / {args.group})")
            state[name + ".weight"] = weight
            layer_groups[name] = args.group
            zeros_seen |= zeros
        if unquantized:
            raise SystemExit(f"error: {len(unquantized)} linear layers were not quantized by GPTQModel, e.g. {unquantized[0]}")
        if zeros_seen != {2 ** (args.bits - 1)}:
            raise SystemExit(f"error: symmetric zeros should all be {2 ** (args.bits - 1)}, found {sorted(zeros_seen)}")
        leftovers = sorted(k for k in tensors if k.endswith(PACKED) and k.rsplit(".", 1)[0] not in linear)
        if leftovers:
            raise SystemExit(f"error: packed tensors of a module that is not one of the model's linear layers: {leftovers[0]}")
        for key, tensor in tensors.items():
            if not key.endswith(PACKED):
                state[key] = tensor.float().contiguous()

        # the other tensors must be the original ones: same names (a tied lm_head stays out) and values
        original = {}
        for file in sorted(Path(args.model).glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                original.update({key: handle.get_tensor(key) for key in handle.keys()})
        original_config = json.loads((Path(args.model) / "config.json").read_text())
        if original_config.get("tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
            original.pop("lm_head.weight", None)
        if set(state) != set(original):
            raise SystemExit(f"error: tensor names differ from the original checkpoint: missing {sorted(set(original) - set(state))[:3]}, "
                             f"extra {sorted(set(state) - set(original))[:3]}")
        changed = sorted(key for key in state if key.rsplit(".", 1)[0] not in linear and not torch.equal(state[key], original[key].float()))
        if changed:
            raise SystemExit(f"error: GPTQModel changed {len(changed)} unquantized tensors, e.g. {changed[0]}")
        packed_bytes = sum(file.stat().st_size for file in files)

        args.out.mkdir(parents=True, exist_ok=True)
        save_file(state, args.out / "model.safetensors", metadata={"format": "pt"})
        original_config.pop("quantization_config", None)
        original_config["torch_dtype"] = original_config["dtype"] = "float32"
        (args.out / "config.json").write_text(json.dumps(original_config, indent=2))
        tokenizer.save_pretrained(args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (args.out / "gptqmodel.json").write_text(json.dumps({
        "version": version("gptqmodel"), "method": args.method, "bits": args.bits, "group_sizes": layer_groups,
        "shapes": {name: list(shape) for name, shape in linear.items()}, "seconds": round(time.perf_counter() - started, 2),
        "quantize_seconds": round(quantize_seconds, 2), "calibration": list(tokens.shape), "dtype": "float32",
        "torch": version("torch"), "transformers": version("transformers"), "cpu_workers": int(os.environ["GPTQMODEL_CPU_WORKERS"]),
        "torch_threads": torch.get_num_threads(), "packed_checkpoint_bytes": packed_bytes, "zero_points": sorted(zeros_seen),
        "patched_packing": dict(Counter(patched)),
        "quantize_config": resolved}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
