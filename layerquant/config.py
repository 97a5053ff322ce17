"""RunConfig: the validated recipe of one quantization run (YAML file + CLI overrides)."""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from layerquant.errors import InvalidSpec
from layerquant.runtime_quant import FLOAT_BITS, RuntimeQuant
from layerquant.specs import SUPPORTED_BITS, QuantSpec
from layerquant.tuning import BlockTuning

# part of every artifact key: bumped whenever stored artifacts or the numbers in them change
# (0.1.1: float32 batch Hessians, PB-LLM positions as indices when smaller; 0.1.2: batch Grams
# summed over a fixed pairwise tree, not a running mean, so calibration shards merge exactly;
# 0.1.3: symmetric grids with a signed full-range scale)
CODE_VERSION = "0.1.3"


def asset_path(*parts: str) -> str:
    """Path of a file shipped inside the package (the embedded default model and texts)."""
    return str(resources.files("layerquant").joinpath("assets", *parts))


def default_model() -> str:
    return asset_path("models", "stories260K")


def default_calib() -> str:
    return asset_path("text", "tinystories_calib_190k.txt")


def default_eval() -> str:
    return asset_path("text", "tinystories_eval_600k.txt")


def text_name(path: str) -> str:
    """What a report calls an evaluation text: its file name without the extension (or the
    datasets folder's name)."""
    return Path(str(path).rstrip("/")).stem


class RunConfig(BaseModel):
    """Everything that determines a run's result (and, separately, where things go)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(default_factory=default_model)
    calib: str = Field(default_factory=default_calib)
    # one evaluation text, or several (a list): each is reported under its name (text_name); the
    # first one is the headline, the one quality gates and the mixed-precision fit use
    eval: str | list[str] = Field(default_factory=default_eval)
    # how .txt texts are decoded; invalid bytes are an error (naming the offset), never replaced
    text_encoding: str = "utf-8"
    # the column a dataset's text is read from (a chat `messages` column is rendered with the
    # tokenizer's chat template); see infra/texts.py for the sources a text can come from
    text_column: str = Field("text", min_length=1)
    # where blocks are reconstructed (weights, stage activations, Hessians, GPTQ solves); the
    # store, checkpoint reading, scoring and evaluation stay on the host. "auto": CUDA if present
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    nsamples: int = Field(128, ge=1, le=100_000)
    seqlen: int = Field(256, ge=2, le=131_072)
    calib_selection: Literal["first", "random"] = "random"
    seed: int = 0
    eval_windows: int = Field(40, ge=1)
    eval_seqlen: int = Field(256, ge=2, le=131_072)
    # the default spec of every decoder linear layer: QuantSpec's own defaults (see there why)
    bits: int = QuantSpec.bits
    group_size: int = QuantSpec.group_size
    # "auto": each matrix's group size chosen from its weights (FineQuant-style, data-free;
    # solvers/granularity.py); with a budget it filters the candidates instead
    granularity: Literal["fixed", "auto"] = "fixed"
    sym: bool = QuantSpec.sym
    method: Literal["rtn", "gptq", "pbllm"] = QuantSpec.method
    act_order: bool = QuantSpec.act_order
    clip_search: bool = QuantSpec.clip_search
    salient_fraction: float = 0.1
    damp_percent: float = Field(0.01, gt=0, le=1)
    # after each block is quantized, fitted to the float block's outputs (0 steps = off):
    # AdaQuant-style refinement of the scales (codes stay on their grid), then norm tweaking.
    # Defaults are BlockTuning's (see there why)
    refine_steps: int = Field(BlockTuning.refine_steps, ge=0, le=100_000)
    refine_lr: float = Field(BlockTuning.refine_lr, gt=0, le=1)
    # a rank-r correction per quantized linear trained with the scales during refinement (BiSup's
    # parameter-efficient fine-tuning; its float16 factors count in avg_bits); 0 = none
    lowrank_rank: int = Field(BlockTuning.lowrank_rank, ge=0, le=4096)
    lowrank_lr: float = Field(BlockTuning.lowrank_lr, gt=0, le=1)
    # with act_bits < 16: a clipping ratio per quantized activation input trained with the scales
    # during refinement (the run-time quantizers use it; no packed format carries it)
    act_clip: bool = BlockTuning.act_clip
    act_clip_lr: float = Field(BlockTuning.act_clip_lr, gt=0, le=1)
    norm_tweak_steps: int = Field(BlockTuning.norm_tweak_steps, ge=0, le=100_000)
    norm_tweak_lr: float = Field(BlockTuning.norm_tweak_lr, gt=0, le=1)
    norm_tweak_loss: Literal["mse", "dist"] = BlockTuning.norm_tweak_loss
    # share of calibration samples held out to pick each tuning step's best iterate
    tuning_holdout: float = Field(BlockTuning.holdout, ge=0, lt=1)
    # where tuning measures a block's output error: "residual" (the block's output itself) or
    # "next_norm" (after the next block's input norm, as that block reads it)
    tuning_space: Literal["residual", "next_norm"] = BlockTuning.space
    # quality gates: a block whose relative output error (against the float block, same
    # inputs) exceeds gate_output_error is redone with the next more generous spec; a run whose
    # perplexity rises by more than max_ppl_increase (a fraction: 0.05 = +5%) fails
    gate_output_error: float | None = Field(None, gt=0)
    max_ppl_increase: float | None = Field(None, gt=0)
    # mixed precision: average bits per weight (scales and zeros counted) the plan must fit
    budget: float | None = Field(None, gt=0)
    # candidate specs for the plan (fields as in QuantSpec; unset fields take the defaults above)
    candidates: list[dict[str, Any]] | None = None
    floors: dict[str, int] = Field(default_factory=dict)  # regex on layer name -> minimum bits
    servable: Literal["vllm"] | None = None
    tie_fused: bool = False  # q/k/v and gate/up share a spec (engines fuse them)
    ip_solver: Literal["cbc", "highs"] = "cbc"
    # per-layer overrides: full layer name (e.g. "model.layers.0.mlp.down_proj") -> spec fields
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # what --out receives: compressed-tensors pack-quantized by default (what vLLM, SGLang and
    # transformers with compressed-tensors load; ~4x smaller than float), the GPTQ checkpoint
    # format, or the dequantized float model (any transformers loads it, no extra package)
    pack_format: Literal["dequantized", "compressed-tensors", "gptq"] = "compressed-tensors"
    # what the model quantizes while it runs (issue 16; layerquant/runtime_quant.py): per-token
    # activations at every quantized linear's input, the KV cache per head and token (its first
    # prompt_kv_tokens positions float, from the float model), and QuaRot's Hadamard rotations. 16 = float
    act_bits: Literal[3, 4, 8, 16] = FLOAT_BITS
    act_group_size: int = Field(0, ge=0)
    kv_bits: Literal[3, 4, 8, 16] = FLOAT_BITS
    kv_group_size: int = Field(0, ge=0)
    prompt_kv_tokens: int = Field(0, ge=0)
    # what the validation scores with prompt_kv_tokens: continuations after one shared prompt (the
    # text's first tokens), or each after its own preceding text (solvers/windows.py context_windows)
    prompt_kv_eval: Literal["shared-prompt", "own-context"] = "shared-prompt"
    rotate: bool = False
    smooth: bool = False
    token_clip_search: bool = False  # below 8 bits: each token's scale of least rounding error (RuntimeQuant)
    # where artifacts and results go (not part of the run's identity)
    store: str = ".layerquant/store"
    out: str | None = None
    # where the blocks are computed (not part of the run's identity: the result is the same to
    # the bit): a local Dask cluster of `workers` processes, or an existing one at
    # `dask_address`; the calibration samples split into `shards` (a power of two; default:
    # the worker count rounded up). Neither set: everything in the flow's own process
    workers: int | None = Field(None, ge=1, le=1024)
    threads_per_worker: int = Field(1, ge=1, le=256)
    dask_address: str | None = None
    shards: int | None = Field(None, ge=1, le=1024)

    @field_validator("bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if value not in SUPPORTED_BITS:
            raise ValueError(f"bits={value} is not supported: use one of {', '.join(map(str, SUPPORTED_BITS))}")
        return value

    @field_validator("shards")
    @classmethod
    def _shards(cls, value: int | None) -> int | None:
        if value is not None and value & (value - 1):
            raise ValueError(f"shards={value} is not a power of two: shard sums merge over a fixed binary tree (use 1, 2, 4, 8...)")
        return value

    @field_validator("dask_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError(f"dask_address={value!r} is not a scheduler address: use e.g. tcp://host:8786")
        return value

    def on_cluster(self) -> bool:
        """Whether blocks run as shard tasks on a Dask cluster."""
        return self.workers is not None or self.dask_address is not None

    def check_cluster_support(self) -> None:
        """A cluster run does the plain staged reconstruction only: say so before anything starts."""
        if not self.on_cluster():
            return
        if self.workers is not None and self.dask_address is not None:
            raise InvalidSpec("both --workers and --dask-address were given",
                              "--workers starts a local cluster, --dask-address uses a running one: pass one of them")
        unsupported = [flag for flag, on in (("block tuning (--refine-steps/--norm-tweak-steps)", self.block_tuning().enabled),
                                             ("--gate-output-error", self.gate_output_error is not None),
                                             ("--budget", self.budget is not None),
                                             ("--device cuda/auto", self.device != "cpu")) if on]
        if unsupported:
            raise InvalidSpec(f"a run over a Dask cluster does not support {', '.join(unsupported)} yet",
                              "leave them out, or run without --workers/--dask-address")

    @field_validator("eval")
    @classmethod
    def _eval(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("the list of evaluation texts is empty: give at least one path")
            names = [text_name(path) for path in value]
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ValueError(f"evaluation texts share the name {repeated[0]!r}: rename or move one of them "
                                 "(results are keyed by the file or folder name)")
            if len(value) == 1:  # one text in a list is the single-text run it always was (same run id)
                return value[0]
        return value

    @model_validator(mode="before")
    @classmethod
    def _rotated_output(cls, data: Any) -> Any:
        """A rotated model's codes live in the rotated basis, and low-rank corrections are no part
        of any packed format: unless a format is asked for (and refused by from_sources), such a
        run is written dequantized (rotations undone, corrections folded into the weights)."""
        if isinstance(data, dict) and (data.get("rotate") or data.get("lowrank_rank")) and data.get("pack_format") is None:
            return {**data, "pack_format": "dequantized"}
        return data

    @field_validator("text_encoding")
    @classmethod
    def _encoding(cls, value: str) -> str:
        import codecs

        try:
            return codecs.lookup(value).name
        except LookupError:
            raise ValueError(f"text encoding {value!r} is unknown: use e.g. utf-8 or latin-1") from None

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int) -> int:
        if value < 0 or 0 < value < 8:
            raise ValueError(f"group_size={value} is out of range: use 0 (per-channel) or >= 8")
        return value

    def eval_texts(self) -> list[str]:
        """The evaluation texts, the first one the headline."""
        return [self.eval] if isinstance(self.eval, str) else list(self.eval)

    def eval_names(self) -> list[str]:
        """The names the report keys each evaluation text's results by (unique: checked)."""
        return [text_name(text) for text in self.eval_texts()]

    def default_spec(self) -> QuantSpec:
        return QuantSpec(
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            method=self.method,
            act_order=self.act_order,
            clip_search=self.clip_search,
            salient_fraction=self.salient_fraction if self.method == "pbllm" else 0.0,
        )

    def block_tuning(self) -> BlockTuning:
        return BlockTuning(refine_steps=self.refine_steps, refine_lr=self.refine_lr, norm_tweak_steps=self.norm_tweak_steps,
                           norm_tweak_lr=self.norm_tweak_lr, norm_tweak_loss=self.norm_tweak_loss, seed=self.seed,
                           holdout=self.tuning_holdout, space=self.tuning_space, lowrank_rank=self.lowrank_rank,
                           lowrank_lr=self.lowrank_lr, act_clip=self.act_clip, act_clip_lr=self.act_clip_lr)

    def runtime_quant(self) -> RuntimeQuant:
        return RuntimeQuant(act_bits=self.act_bits, act_group_size=self.act_group_size, kv_bits=self.kv_bits,
                            kv_group_size=self.kv_group_size, prompt_kv_tokens=self.prompt_kv_tokens, rotate=self.rotate,
                            smooth=self.smooth, seed=self.seed, token_clip_search=self.token_clip_search)

    def needs_calibration(self) -> bool:
        """Whether the run needs calibration samples and block forwards at all: GPTQ and PB-LLM
        need input Hessians, a budget scores layers on data, a gate and block tuning compare
        with the float block's outputs. Round-to-nearest alone (granularity "auto" included)
        needs only the weights."""
        methods = {self.method} | {override.get("method", self.method) for override in self.overrides.values()}
        return (methods != {"rtn"} or self.budget is not None or self.gate_output_error is not None
                or self.block_tuning().enabled or self.smooth)  # smoothing reads the blocks' input statistics

    def spec_for(self, layer: str) -> QuantSpec:
        base = self.default_spec()
        if layer in self.overrides:
            return QuantSpec.from_dict({**base.to_dict(), **self.overrides[layer]})
        return base

    def candidate_specs(self) -> list[QuantSpec]:
        base = self.default_spec().to_dict()
        if self.candidates:
            return [QuantSpec.from_dict({**base, **candidate}) for candidate in self.candidates]
        return [QuantSpec.from_dict({**base, "bits": bits, "group_size": group}) for bits in SUPPORTED_BITS for group in (32, 64, 128)]

    def identity(self) -> dict[str, Any]:
        """The fields that define the result; store/out only say where it goes."""
        identity = self.model_dump(exclude={"store", "out", "pack_format", "workers", "threads_per_worker", "dask_address", "shards"})
        # the space means nothing without tuning, and "residual" is what runs before it had: left
        # out in both cases, untuned and residual-space runs keep the ids they always had
        if identity["tuning_space"] == "residual" or not self.block_tuning().enabled:
            del identity["tuning_space"]
        if identity["text_encoding"] == "utf-8":  # the default keeps the ids runs had before the setting
            del identity["text_encoding"]
        if identity["text_column"] == "text":  # likewise
            del identity["text_column"]
        if identity["prompt_kv_eval"] == "shared-prompt":  # likewise
            del identity["prompt_kv_eval"]
        if identity["device"] == "cpu":  # a GPU's float arithmetic differs in the last bits: part of the result
            del identity["device"]
        if not identity["lowrank_rank"]:  # likewise: runs without a correction keep their ids
            del identity["lowrank_rank"], identity["lowrank_lr"]
        if not identity["act_clip"]:  # likewise
            del identity["act_clip"], identity["act_clip_lr"]
        # run-time quantization: in the identity only as far as it is on, so weight-only runs keep their ids
        runtime_fields = ("act_bits", "act_group_size", "kv_bits", "kv_group_size", "prompt_kv_tokens", "rotate", "smooth",
                          "token_clip_search")
        for name in runtime_fields:
            del identity[name]
        runtime = self.runtime_quant().identity()
        if runtime:
            identity["runtime_quant"] = runtime
        return identity

    def run_id(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_sources(cls, recipe: str | None = None, **overrides: Any) -> "RunConfig":
        data: dict[str, Any] = {}
        if recipe:
            path = Path(recipe)
            if not path.is_file():
                raise InvalidSpec(f"recipe {recipe} does not exist", "pass --recipe a YAML file")
            try:
                loaded = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise InvalidSpec(f"recipe {recipe} is not valid YAML ({exc})", "fix the YAML syntax") from None
            if not isinstance(loaded, dict):
                raise InvalidSpec(f"recipe {recipe} must be a mapping of settings", "see recipes/ for examples")
            data.update(loaded)
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            config = cls(**data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "recipe"
            raise InvalidSpec(f"invalid setting {where}: {first['msg']}", "fix the flag or recipe value") from None
        config.default_spec()  # validates the combination
        runtime = config.runtime_quant()
        if runtime.rotate and config.pack_format != "dequantized":
            raise InvalidSpec(f"a rotated run cannot be packed as {config.pack_format} yet: its codes live in the rotated basis and "
                              "the online Hadamards (down_proj, cached keys) have no place in that format",
                              "use --pack-format dequantized (the rotations undone in the written weights), or drop --rotate")
        if config.prompt_kv_eval != "shared-prompt" and not config.prompt_kv_tokens:
            raise InvalidSpec(f"prompt_kv_eval {config.prompt_kv_eval} says which prompts the float prompt cache is evaluated after, "
                              "and prompt_kv_tokens is 0", "add --prompt-kv-tokens P (e.g. 64), or drop --prompt-kv-eval")
        if config.act_clip and (not config.refine_steps or not runtime.quantizes_activations):
            raise InvalidSpec("act_clip trains activation clipping ratios during scale refinement, so it needs both act_bits below "
                              f"16 and refine_steps (got act_bits={config.act_bits}, refine_steps={config.refine_steps})",
                              "add --act-bits 4 (or 3, 8) and --refine-steps N, or drop --act-clip")
        if config.lowrank_rank and not config.refine_steps:
            raise InvalidSpec("lowrank_rank trains its corrections during scale refinement, and refine_steps is 0",
                              "add --refine-steps N (e.g. 50), or drop --lowrank-rank")
        if config.lowrank_rank and config.pack_format != "dequantized":
            raise InvalidSpec(f"a run with low-rank corrections cannot be packed as {config.pack_format}: the format has no place "
                              "for a float correction next to the integer codes",
                              "use --pack-format dequantized (each correction folded into its weight), or drop --lowrank-rank")
        if config.pack_format == "gptq" and (runtime.quantizes_activations or runtime.quantizes_cache):
            raise InvalidSpec("the GPTQ format cannot say that activations or the KV cache are quantized",
                              "use --pack-format compressed-tensors (input_activations / kv_cache_scheme), or dequantized")
        if runtime.rotate and config.budget is not None:
            raise InvalidSpec("rotate with a mixed-precision budget is not built yet: layers are scored on unrotated weights",
                              "drop --budget or --rotate")
        for layer in config.overrides:
            config.spec_for(layer)
        if config.budget is not None:
            config.candidate_specs()
        return config
