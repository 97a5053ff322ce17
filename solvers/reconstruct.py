"""Quantize one decoder block in true-sequential order: each group of linear layers is quantized
with Hessians collected from inputs that already went through the quantized earlier groups."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise

import torch
from torch import nn

from layerquant.block_artifact import BlockArtifact
from layerquant.cancellation import raise_if_cancelled
from layerquant.errors import InvalidSpec
from layerquant.runtime_quant import ACT_CLIP_MIN, act_clip_key
from layerquant.specs import QuantSpec
from layerquant.tuning import LOWRANK_PARTS, BlockTuning, has_lowrank_correction  # BlockTuning re-exported: callers built it from here
from layerquant.solvers.gptq import HessianSetup, gptq_row_errors, hessian_weighted_error, prepare_hessian, quantize_weight
from layerquant.solvers.hessian import PairwiseSum, batch_gram, hessian_from_sum
from layerquant.solvers.staged import staged_quantize

BlockForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class LayerOutcome:
    name: str  # block-relative, e.g. "self_attn.q_proj"
    spec: QuantSpec
    tensors: dict[str, torch.Tensor]  # what is stored: codes/scales/zeros, or PB-LLM's parts
    shape: tuple[int, int]  # [out_features, in_features]
    error: float  # relative Hessian-weighted error tr(E H E^T) / tr(W H W^T)
    damp_used: float
    seconds: float


def quantize_layer(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, damp_percent: float, layer: str):
    """(stored tensors, dequantized weight, damp used) for one matrix under one spec."""
    if spec.method == "pbllm":
        from layerquant.solvers.pbllm import binarize_partial

        result = binarize_partial(weight, hessian, spec, damp_percent=damp_percent, layer=layer)
        return result.to_tensors(), result.dequantize(), getattr(result, "damp_used", damp_percent)
    result = quantize_weight(weight, hessian, spec, damp_percent=damp_percent, layer=layer)
    return result.quantized.to_tensors(), result.quantized.dequantize(), result.damp_used


class _InputsSeen(Exception):
    """Raised by a Hessian hook once every hooked layer has seen the batch: the rest of the
    block's forward would be thrown away."""


def collect_hessians(
    block: nn.Module, forward: BlockForward, inputs: torch.Tensor, layer_names: Sequence[str], batch_size: int = 8,
    keep_outputs: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Input Hessians of the named linear layers over all `inputs`, and the block's outputs
    when `keep_outputs` (else None).

    `forward` is called on `batch_size` samples at a time and must run them as one batch.
    Without `keep_outputs` each batch stops at the last hooked layer, so the Hessian of an
    attention projection does not pay for the MLP behind it. Layers reading the same tensor
    (q/k/v, gate/up) are hooked once per group by the caller passing only the group's first
    layer name.
    """
    # the same fixed-order sum over batches as the staged pass: the same Hessians to the bit
    sums = {name: PairwiseSum() for name in layer_names}
    rows = dict.fromkeys(layer_names, 0)
    waiting: set[str] = set()

    def make_hook(name: str):
        def hook(_module, args):
            gram, n = batch_gram(args[0].detach())
            sums[name].add(gram)
            rows[name] += n
            waiting.discard(name)
            if not waiting and not keep_outputs:
                raise _InputsSeen

        return hook

    handles = [block.get_submodule(name).register_forward_pre_hook(make_hook(name)) for name in layer_names]
    outputs = []
    try:
        for start in range(0, inputs.shape[0], batch_size):
            raise_if_cancelled()  # Ctrl-C of a CLI run: stop between batches, not after the block
            waiting.update(layer_names)
            try:
                outputs.append(forward(block, inputs[start : start + batch_size]))
            except _InputsSeen:
                pass
    finally:
        for handle in handles:
            handle.remove()
    # accumulated in float64 for accuracy, handed on in float32: GPTQ factors in float32 and
    # a float64 copy alive next to the factorization doubled a block's peak memory
    hessians = {name: hessian_from_sum(sums[name].total(), rows[name]) for name in layer_names}
    return hessians, torch.cat(outputs) if keep_outputs else None


def quantize_group_in_place(block: nn.Module, names: Sequence[str], hessian: torch.Tensor, specs: dict[str, QuantSpec],
                            damp_percent: float, layer_prefix: str, consume_hessian: bool = False) -> list[LayerOutcome]:
    """Quantize the named linears of `block` (one group, one input Hessian), replacing each
    weight by its dequantized value; returns what happened to each. `consume_hessian`: the
    caller is done with the Hessian, so the group's last unit may free it once factored.

    Neighbouring layers with the same integer-grid spec (q/k/v, gate/up under a uniform plan)
    are solved as one matrix of their stacked rows: GPTQ treats every row on its own under the
    shared Hessian, so the codes are the same, while the damped inverse is factored once and
    the column loop runs once instead of once per layer."""
    outcomes = []
    runs = _same_spec_runs(names, specs)
    for position, run in enumerate(runs):
        raise_if_cancelled()  # Ctrl-C of a CLI run: stop between layers, not after the block
        linears = [block.get_submodule(name) for name in run]
        solved = solve_unit(run, [linear.weight.detach().float() for linear in linears], hessian, specs[run[0]], damp_percent, layer_prefix,
                            consume_hessian=consume_hessian and position == len(runs) - 1)
        for linear, (outcome, weight_hat) in zip(linears, solved):
            with torch.no_grad():
                linear.weight.copy_(weight_hat.to(linear.weight.dtype))
            outcomes.append(outcome)
        del solved
    return outcomes


def solve_unit(run: Sequence[str], weights: Sequence[torch.Tensor], hessian: torch.Tensor, spec: QuantSpec, damp_percent: float,
               layer_prefix: str, consume_hessian: bool = False) -> list[tuple[LayerOutcome, torch.Tensor]]:
    """Quantize one solve unit (`solve_units`: layers sharing a Hessian and a spec, stacked
    into one matrix when there are several): (outcome, dequantized weight) per layer. The
    in-process pass solves all of the unit's row chunks here; a cluster solves them in one or
    more tasks (`solve_unit_rows`) and assembles the same pieces the same way, so both give
    the same codes and errors to the bit."""
    return assemble_unit(run, spec, solve_unit_rows(run, weights, hessian, spec, damp_percent, layer_prefix,
                                                    consume_hessian=consume_hessian))


# rows of a GPTQ solve unit solved at a time (the last chunk may be short). GPTQ treats every row
# on its own under the shared Hessian, so a chunk changes nothing but where the vectorized
# kernels' tails fall; the chunking depends on the unit's row count alone, so the in-process
# pass and a cluster's tasks (however many, on however many workers) run the same arithmetic per
# chunk and get the same codes to the bit, while a cluster can solve one unit's chunks on several
# workers at once (a hidden-2048 down_proj is otherwise one serial solve of a third of a block).
SOLVE_CHUNK_ROWS = 1024


def solve_chunks(total_rows: int, spec: QuantSpec) -> list[tuple[int, int]]:
    """[start, stop) row ranges of a unit's stacked rows that are solved as one matrix each:
    chunks of SOLVE_CHUNK_ROWS for GPTQ; the whole unit for round-to-nearest (rows need no shared
    factor) and PB-LLM (its salient selection looks across the whole matrix)."""
    if spec.method != "gptq":
        return [(0, total_rows)]
    return [(start, min(start + SOLVE_CHUNK_ROWS, total_rows)) for start in range(0, total_rows, SOLVE_CHUNK_ROWS)]


@dataclass
class UnitPiece:
    """Rows [start, stop) of one layer of a solve unit, as one chunk's solve left them."""

    name: str
    start: int
    stop: int
    tensors: dict[str, torch.Tensor]  # the stored parts of these rows
    weight_hat: torch.Tensor  # their dequantized weights
    error_num: float  # tr(E H E^T) over these rows
    error_den: float  # tr(W H W^T) over these rows
    damp_used: float
    seconds: float


def prepare_unit(run: Sequence[str], hessian: torch.Tensor, spec: QuantSpec, damp_percent: float, layer_prefix: str,
                 consume: bool = False) -> HessianSetup | None:
    """The factor a GPTQ unit's row chunks share (`prepare_hessian`; `consume` frees the Hessian
    once factored), None for methods that solve from the Hessian itself."""
    if spec.method != "gptq":
        return None
    return prepare_hessian(hessian, spec.act_order, damp_percent, layer_prefix + "+".join(run), consume=consume)


def solve_unit_rows(run: Sequence[str], weights: Sequence[torch.Tensor], hessian: torch.Tensor, spec: QuantSpec, damp_percent: float,
                    layer_prefix: str, rows: tuple[int, int] | None = None, setup: HessianSetup | None = None,
                    consume_hessian: bool = False) -> list[UnitPiece]:
    """Solve the unit's chunks (`solve_chunks`) that lie within `rows` of its stacked rows (all
    of them by default), with the Hessian's factor computed once for them (or given: `setup`,
    from `prepare_unit`); the result cut at the layers' boundaries. `consume_hessian`: this
    is the Hessian's last use, so a GPTQ unit frees it once factored (the factorization's
    peak is then two Hessian-sized buffers, not three)."""
    sizes = [w.shape[0] for w in weights]
    bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
    low, high = rows or (0, bounds[-1][1])
    chunks = [(a, b) for a, b in solve_chunks(bounds[-1][1], spec) if low <= a and b <= high]
    stacked = weights[0] if len(weights) == 1 else torch.cat([w for w, (a, b) in zip(weights, bounds) if a < high and b > low])
    offset = next(a for a, b in bounds if b > low)  # stacked row of `stacked`'s first row
    label = layer_prefix + "+".join(run)
    if setup is None:
        setup = prepare_unit(run, hessian, spec, damp_percent, layer_prefix, consume=consume_hessian)
    pieces = []
    for a, b in chunks:
        start = time.perf_counter()
        chunk = stacked[a - offset : b - offset]
        if setup is not None:
            result = quantize_weight(chunk, hessian, spec, damp_percent=damp_percent, layer=label, setup=setup)
            tensors, weight_hat, damp_used = result.quantized.to_tensors(), result.quantized.dequantize(), result.damp_used
            row_errors = gptq_row_errors(chunk, weight_hat, result, setup)
        else:
            tensors, weight_hat, damp_used = quantize_layer(chunk, hessian, spec, damp_percent, label)
            row_errors = None
        seconds = time.perf_counter() - start
        for name, (la, lb) in zip(run, bounds):
            first, last = max(a, la), min(b, lb)
            if first >= last:
                continue
            # a layer's rows within the chunk; a piece that is the whole chunk keeps its parts as they
            # are (PB-LLM's are not all row-major)
            whole = (first, last) == (a, b)
            original = chunk[first - a : last - a]
            piece_hat = weight_hat if whole else weight_hat[first - a : last - a]
            parts = tensors if whole else {part: t[first - a : last - a].contiguous() for part, t in tensors.items()}
            if row_errors is not None:
                error_num, error_den = (float(t[first - a : last - a].sum()) for t in row_errors)
            else:
                error_num = hessian_weighted_error(original, piece_hat, hessian)
                error_den = hessian_weighted_error(original, torch.zeros_like(original), hessian)
            pieces.append(UnitPiece(name, first - la, last - la, parts, piece_hat.contiguous(), error_num, error_den, damp_used,
                                    seconds * (last - first) / (b - a)))
    return pieces


def _layer_pieces(pieces: Sequence[UnitPiece], name: str) -> list[UnitPiece]:
    """The pieces of layer `name` in row order; they must cover its rows exactly once."""
    own = sorted((p for p in pieces if p.name == name), key=lambda p: p.start)
    if not own or own[0].start != 0 or any(x.stop != y.start for x, y in pairwise(own)):
        raise ValueError(f"the solved pieces of {name} do not cover its rows: {[(p.start, p.stop) for p in own]}")
    return own


def dequantized_weights(pieces: Sequence[UnitPiece]) -> dict[str, torch.Tensor]:
    """Layer -> its dequantized weight, from solved pieces of one or more units (any order)."""
    names = dict.fromkeys(p.name for p in pieces)
    return {name: torch.cat([p.weight_hat for p in _layer_pieces(pieces, name)]) for name in names}


def assemble_unit(run: Sequence[str], spec: QuantSpec, pieces: Sequence[UnitPiece]) -> list[tuple[LayerOutcome, torch.Tensor]]:
    """(outcome, dequantized weight) per layer of the unit from its pieces (any order): parts
    and weights concatenated by rows, the relative error summed over the pieces in row order."""
    solved = []
    for name in run:
        own = _layer_pieces(pieces, name)
        if len(own) == 1:
            tensors, weight_hat = own[0].tensors, own[0].weight_hat
        else:
            tensors = {part: torch.cat([p.tensors[part] for p in own]) for part in own[0].tensors}
            weight_hat = torch.cat([p.weight_hat for p in own])
        error = sum(p.error_num for p in own) / max(sum(p.error_den for p in own), 1e-30)
        outcome = LayerOutcome(name, spec, tensors, tuple(weight_hat.shape), error, own[0].damp_used, sum(p.seconds for p in own))
        solved.append((outcome, weight_hat))
    return solved


def solve_units(names: Sequence[str], specs: dict[str, QuantSpec]) -> list[list[str]]:
    """The solve units of one group: see `_same_spec_runs`."""
    return _same_spec_runs(names, specs)


def _same_spec_runs(names: Sequence[str], specs: dict[str, QuantSpec]) -> list[list[str]]:
    """`names` cut into runs of neighbours that one stacked solve can serve: the same spec, an
    integer-grid method (PB-LLM's salient selection looks across the whole matrix)."""
    runs: list[list[str]] = []
    for name in names:
        spec = specs[name]
        if runs and spec.method in ("gptq", "rtn") and specs[runs[-1][0]] == spec:
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs


@dataclass
class SequentialQuantization:
    outcomes: list[LayerOutcome]
    outputs: torch.Tensor  # the quantized block's outputs on the inputs it was fitted on
    seconds: dict[str, float]  # forward / hessian / solve


def quantize_block_sequential(
    block: nn.Module,
    forward: BlockForward,
    inputs: torch.Tensor,
    groups: Sequence[Sequence[str]],
    specs: dict[str, QuantSpec],
    damp_percent: float = 0.01,
    layer_prefix: str = "",
    batch_size: int = 8,
    drop_passed_weights: bool = False,
) -> SequentialQuantization:
    """Quantize `block`'s linear layers in place, true-sequentially, in one forward pass
    (`drop_passed_weights`: see `staged_quantize`; the outcomes still hold every layer's codes).

    Layers without a spec stay float. Each group's Hessian comes from the partially quantized
    block, so later groups compensate earlier groups' error; `solvers/staged.py` gets there
    with one pass over `inputs` instead of one pass per group. In place, because a second copy
    of a block is the largest avoidable allocation of a run.
    """
    outcomes: list[LayerOutcome] = []
    todo = [[name for name in group if name in specs] for group in groups]

    def quantize_group(names: Sequence[str], hessian: torch.Tensor) -> None:
        # staged_quantize drops the Hessian after this call: the last unit frees it once factored
        outcomes.extend(quantize_group_in_place(block, names, hessian, specs, damp_percent, layer_prefix, consume_hessian=True))

    staged = staged_quantize(block, forward, inputs, [g for g in todo if g], quantize_group, batch_size, drop_passed_weights)
    return SequentialQuantization(outcomes, staged.outputs, staged.seconds)


def quantize_block_data_free(weights: dict[str, torch.Tensor], specs: dict[str, QuantSpec]) -> list[LayerOutcome]:
    """Round-to-nearest of a block's layers from their weights alone: no calibration sample
    and no forward. `error` is then the relative Frobenius error ||W - W_hat||^2 / ||W||^2,
    the Hessian-weighted error with H = I (no input statistics to weigh by)."""
    outcomes = []
    for name, spec in specs.items():
        if spec.method != "rtn":
            raise InvalidSpec(f"{name}: {spec.method} needs calibration data", "quantize it with calibration, or use method rtn")
        start = time.perf_counter()
        weight = weights[f"{name}.weight"].float()
        quantized = quantize_weight(weight, None, spec).quantized
        error = float(((quantized.dequantize() - weight) ** 2).sum(dtype=torch.float64) / (weight**2).sum(dtype=torch.float64).clamp(min=1e-30))
        outcomes.append(LayerOutcome(name, spec, quantized.to_tensors(), tuple(weight.shape), error, 0.0, time.perf_counter() - start))
    return outcomes


def relative_output_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - reference||^2 / ||reference||^2 over a block's outputs."""
    ref = reference.double()
    return float(((approx.double() - ref) ** 2).sum() / (ref**2).sum().clamp(min=1e-30))


# samples whose float outputs measure a block's output error when nothing else needs the float
# block's outputs: the float pass then costs 4/N of a forward, not a whole one (1/8 of one on
# Gemma 3's 32 calibration samples). On stories260K's real text the 4-sample estimate stays
# within a factor 3 of the all-sample error (tests/test_staged.py)
ERROR_SAMPLES = 4


@dataclass
class BlockReconstruction:
    outcomes: list[LayerOutcome]
    outputs: torch.Tensor | None  # quantized block's outputs: the next block's inputs (None: data-free)
    output_error: float | None  # relative error of the quantized block vs the float block, same inputs
    seconds: float
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)  # block parameter -> tuned value (norms)
    tuning: dict = field(default_factory=dict)  # what refinement / norm tweaking achieved
    # forward / hessian / solve / tuning seconds, and how many block forwards over all samples
    # the reconstruction cost (the staged pass is 1; the float reference and a re-run after
    # tuning add to it)
    timing: dict[str, float] = field(default_factory=dict)
    forwards: float = 1.0
    output_error_samples: int = 0  # how many samples `output_error` was measured on

    def to_host(self) -> "BlockReconstruction":
        """The same result with every tensor in host memory (what the store writes)."""
        for outcome in self.outcomes:
            outcome.tensors = {part: t.cpu() for part, t in outcome.tensors.items()}
        self.outputs = None if self.outputs is None else self.outputs.cpu()
        self.overrides = {name: t.cpu() for name, t in self.overrides.items()}
        return self


def resolve_device(choice: str) -> str | None:
    """The device a run's `device` setting means here: None for the host (computing where the
    tensors are, as always), "cuda" for the GPU; "auto" takes CUDA when present."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return None
    if not torch.cuda.is_available():
        raise InvalidSpec("--device cuda was asked for but this machine has no usable CUDA device",
                          "use --device cpu, or --device auto to take a GPU only when there is one")
    return "cuda"


def reconstruct_block(
    arch,
    config,
    index: int,
    weights: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    specs: dict[str, QuantSpec],
    damp_percent: float = 0.01,
    batch_size: int = 8,
    layer_prefix: str = "",
    tuning: BlockTuning | None = None,
    tuning_targets: torch.Tensor | None = None,
    next_norm: nn.Module | None = None,
    full_output_error: bool = False,
    error_samples: int = ERROR_SAMPLES,
    device: str | torch.device | None = None,
    runtime=None,
    consume_weights: bool = False,
) -> BlockReconstruction:
    """Quantize decoder block `index` (float `weights`, block-relative names) on `inputs` [N, L, H],
    then apply `tuning` (refinement, norm tweaking) if given, fitted to `tuning_targets`: by
    default the float block's outputs on `inputs`; the float model's hidden states after this
    block let tuning also make up for the error earlier blocks left. With `tuning.space`
    "next_norm", `next_norm` (the next block's input norm, or the final norm after the last
    block) is applied to outputs and targets before they are compared.

    The float block runs over every sample only when something needs all its outputs (tuning,
    or `full_output_error` for a quality gate); otherwise the output error is measured on the
    first `error_samples` samples.

    With `device` (e.g. "cuda"), the block's weights, each batch's activations, the Hessians
    and the solves live there (`inputs` may stay in host memory, pinned for fast copies); what
    is returned is on the host. None computes where the tensors already are.

    `runtime` (a `solvers.activations.BlockRuntime`), when given, makes the block run as the
    quantized model runs: fake-quantized activations and KV cache, online rotations. The float
    reference, the Hessians and the outputs handed to the next block all see it, so GPTQ fits
    the weights to the inputs they will really get.

    `consume_weights`: the caller hands `weights` over and the dict is emptied once the block
    holds them, so an untuned block frees each group's weights once every batch has passed it
    (the caller must hold no other reference to the tensors for that to free anything)."""
    if device is None:
        return _reconstruct_block(arch, config, index, weights, inputs, specs, damp_percent, batch_size, layer_prefix,
                                  tuning, tuning_targets, next_norm, full_output_error, error_samples, runtime=runtime,
                                  consume_weights=consume_weights)
    device = torch.device(device)
    if inputs.device.type == "cpu" and device.type == "cuda":
        inputs = inputs.pin_memory()
    # factory calls inside the solvers (GPTQ's buffers, rotary tables, masks) follow the device
    on_device = {name: t.to(device) for name, t in weights.items()}
    if consume_weights:
        weights.clear()
    with torch.device(device):
        result = _reconstruct_block(
            arch, config, index, on_device, inputs, specs, damp_percent, batch_size,
            layer_prefix, tuning, None if tuning_targets is None else tuning_targets.to(device),
            None if next_norm is None else next_norm.to(device), full_output_error, error_samples, device, runtime,
            consume_weights=consume_weights)
    return result.to_host()


def _reconstruct_block(arch, config, index, weights, inputs, specs, damp_percent, batch_size, layer_prefix, tuning,
                       tuning_targets, next_norm, full_output_error, error_samples, device=None, runtime=None,
                       consume_weights=False) -> BlockReconstruction:
    from layerquant.solvers.architectures import BlockContext, build_block, run_block

    start = time.perf_counter()
    context = BlockContext(arch, config, seq_len=inputs.shape[1])
    smoothed_norms: dict[str, torch.Tensor] = {}
    if runtime is not None and runtime.settings.smooth:
        weights, smoothed_norms = _smoothed(arch, config, index, weights, inputs, context, batch_size)
    block = build_block(arch, config, index, weights)
    if consume_weights:
        weights.clear()  # the block holds them now
    del weights
    n_samples = inputs.shape[0]

    def forward(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if device is not None:  # one batch at a time to the device: the inputs may not fit there
            return torch.cat([run_block(module, context, index, hidden[i : i + batch_size].to(device, non_blocking=True), batch_size)
                              for i in range(0, hidden.shape[0], batch_size)])
        return run_block(module, context, index, hidden, batch_size)

    tuned = tuning is not None and tuning.enabled
    if tuned and device is not None:
        inputs = inputs.to(device)  # tuning samples batches at random: keep them where it computes
    reference_count = n_samples if (tuned and tuning_targets is None) or full_output_error else min(error_samples, n_samples)
    reference_start = time.perf_counter()
    # the float block: its online rotations (part of its function) but no quantizer yet
    float_hooks = [] if runtime is None else runtime.without_quantizers().install(block)
    float_outputs = forward(block, inputs[:reference_count])
    for handle in float_hooks:
        handle.remove()
    float_seconds = time.perf_counter() - reference_start
    act_clips: dict[str, torch.Tensor] = {}
    if runtime is not None and tuned and tuning.act_clip and tuning.refine_steps and runtime.settings.quantizes_activations:
        # trainable clipping ratios, one per quantized input, starting at the full range (GPTQ
        # below sees exactly what it saw without them); tuning trains them in place
        groups = [group for group in arch.linear_groups if group[0] in runtime.quantized]
        act_clips = {group[0]: torch.ones((), requires_grad=True) for group in groups}
        runtime = replace(runtime, act_clip={name: act_clips[group[0]] for group in groups for name in group})
    if runtime is not None:
        # from here on the block runs as the quantized model runs; installed before
        # staged_quantize's Hessian hooks, so those see the transformed inputs
        runtime.install(block)
        context.kv_cache = runtime.kv_cache()
    # untuned, the block is not run again after the pass: its passed groups' weights can go
    sequential = quantize_block_sequential(block, forward, inputs, arch.linear_groups, specs, damp_percent,
                                           layer_prefix=layer_prefix, batch_size=batch_size, drop_passed_weights=not tuned)
    outcomes, outputs = sequential.outcomes, sequential.outputs
    timing = dict(sequential.seconds)
    timing["forward"] += float_seconds
    forwards = 1.0 + reference_count / n_samples
    overrides: dict[str, torch.Tensor] = {}
    report: dict = {}
    if tuned:
        targets = float_outputs if tuning_targets is None else tuning_targets
        if tuning.space == "next_norm" and next_norm is None:
            raise InvalidSpec("tuning in the next_norm space needs the next block's input norm",
                              "pass next_norm (the final norm for the last block), or use space 'residual'")
        project = next_norm if tuning.space == "next_norm" else None
        tuning_start = time.perf_counter()
        overrides, report = tune_block(block, context.block_kwargs(index), arch.norms, outcomes, inputs, targets, tuning, project,
                                       act_clips)
        timing["tuning"] = time.perf_counter() - tuning_start
        # tuning moved weights and norms: the next block reads the tuned block's outputs
        rerun_start = time.perf_counter()
        outputs = forward(block, inputs)
        timing["forward"] += time.perf_counter() - rerun_start
        forwards += 1.0
    error = relative_output_error(float_outputs, outputs[:reference_count])
    overrides = smoothed_norms | overrides  # tuned norms start from the smoothed ones
    return BlockReconstruction(outcomes, outputs, error, time.perf_counter() - start, overrides, report,
                               {k: round(v, 3) for k, v in timing.items()}, forwards, reference_count)


def _smoothed(arch, config, index, weights, inputs, context, batch_size):
    """SmoothQuant's migration on the float block's own input statistics (solvers/smooth.py):
    (smoothed weights, the norm weights it changed, which the artifact stores as overrides: the
    quantized linears carry their share in their stored codes)."""
    from layerquant.solvers.architectures import build_block, run_block
    from layerquant.solvers.smooth import input_absmax, smooth_block_weights

    plain = build_block(arch, config, index, weights)
    stats = input_absmax(plain, lambda module, hidden: run_block(module, context, index, hidden, batch_size), inputs)
    del plain
    smoothed = smooth_block_weights(arch, weights, stats)
    norms = {f"{name}.weight": smoothed[f"{name}.weight"] for name in (arch.input_norm, arch.mlp_norm)}
    return smoothed, norms


def tune_block(
    block: nn.Module,
    block_kwargs: dict,
    norm_names: Sequence[str],
    outcomes: list[LayerOutcome],
    inputs: torch.Tensor,
    float_outputs: torch.Tensor,
    tuning: BlockTuning,
    project: nn.Module | None = None,
    act_clips: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Refine the scales of `outcomes` (updated in place, with the block's weights) and tweak
    the block's norms; returns (tuned norm weights by parameter name, and the trained clipping
    ratios as "{linear}.act_clip"; what each step achieved). `project` (a frozen module), when
    given, maps outputs and targets alike before every loss. `act_clips`: the activation
    clipping ratios the block's run-time hooks read (first linear of a group -> scalar),
    trained with the scales."""
    from layerquant.solvers.grid import QuantizedWeight
    from layerquant.solvers.norm_tweak import functional_block_forward, norm_weights_of, tweak_norms
    from layerquant.solvers.refine import refine_scales

    report: dict = {}
    overrides: dict[str, torch.Tensor] = {}
    clip_overrides: dict[str, torch.Tensor] = {}
    common = {"batch_size": tuning.batch_size, "seed": tuning.seed}
    if project is not None:
        project = project.requires_grad_(False)
        with torch.no_grad():
            float_outputs = torch.cat([project(float_outputs[i : i + tuning.batch_size]) for i in range(0, len(float_outputs), tuning.batch_size)])
    held_out = int(round(tuning.holdout * inputs.shape[0]))
    if 0 < held_out < inputs.shape[0]:
        common["validation"] = (inputs[-held_out:], float_outputs[-held_out:])
        inputs, float_outputs = inputs[:-held_out], float_outputs[:-held_out]
    # PB-LLM layers have no integer grid whose scales could move
    refinable = {o.name: o for o in outcomes if o.spec.method != "pbllm"}
    if tuning.refine_steps and refinable:
        layers = {name: QuantizedWeight.from_tensors(o.tensors, o.spec) for name, o in refinable.items()}
        weight_forward = _projected(functional_block_forward(block, [f"{name}.weight" for name in layers], **block_kwargs), project)
        refined, stats = refine_scales(weight_forward, layers, inputs, float_outputs, steps=tuning.refine_steps, lr=tuning.refine_lr,
                                       lowrank_rank=tuning.lowrank_rank, lowrank_lr=tuning.lowrank_lr, live_params=act_clips,
                                       live_lr=tuning.act_clip_lr, **common)
        with torch.no_grad():
            for name, quantized in refined.items():
                tensors = quantized.to_tensors()
                correction = stats.corrections.get(name)
                if correction is not None:  # stored even when the unrefined (zero) one won: the layer's size is the recipe's
                    tensors |= dict(zip(LOWRANK_PARTS, correction))
                refinable[name].tensors = tensors
                linear = block.get_submodule(name)
                linear.weight.copy_(stored_weight(tensors, quantized.spec).to(linear.weight.dtype))
        report["refine"] = {"loss_before": stats.initial_loss, "loss_after": stats.best_loss, "best_step": stats.best_step,
                            "seconds": round(stats.seconds, 3)}
        if tuning.lowrank_rank:
            report["refine"]["lowrank_rank"] = tuning.lowrank_rank
        if act_clips:
            clip_values = {name: value.detach().clamp(ACT_CLIP_MIN, 1.0).clone() for name, value in stats.live.items()}
            for name, value in act_clips.items():  # the hooks (norm tweaking, the rerun) use the chosen ratios, requiring no grad
                value.requires_grad_(False).copy_(clip_values[name])
            clip_overrides = {act_clip_key(name): value for name, value in clip_values.items()}
            report["refine"]["act_clip"] = {name: round(float(value), 4) for name, value in clip_values.items()}
    if tuning.norm_tweak_steps:
        start = norm_weights_of(block, norm_names)
        norm_forward = _projected(functional_block_forward(block, norm_names, **block_kwargs), project)
        tweaked, stats = tweak_norms(norm_forward, start, inputs, float_outputs, steps=tuning.norm_tweak_steps,
                                     lr=tuning.norm_tweak_lr, loss=tuning.norm_tweak_loss, **common)
        params = dict(block.named_parameters())
        with torch.no_grad():
            for key, value in tweaked.items():
                params[key].copy_(value)
        overrides = {key: value.detach().clone() for key, value in tweaked.items() if stats.best_step > 0}
        report["norm_tweak"] = {"loss": tuning.norm_tweak_loss, "loss_before": stats.initial_loss, "loss_after": stats.best_loss,
                                "best_step": stats.best_step, "seconds": round(stats.seconds, 3)}
    return overrides | clip_overrides, report


def _projected(forward, project: nn.Module | None):
    if project is None:
        return forward
    return lambda weights, hidden: project(forward(weights, hidden))


def stored_weight(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """The dequantized float32 weight of one layer from its stored tensors, its low-rank
    correction (if it has one) added."""
    if spec.method == "pbllm":
        from layerquant.solvers.pbllm import PBLLMResult

        return PBLLMResult.from_tensors(tensors, spec).dequantize()
    from layerquant.solvers.grid import dequantize_grouped

    weight = dequantize_grouped(tensors["codes"], tensors["scales"], tensors["zeros"], spec.group_size)
    if has_lowrank_correction(tensors):
        lowrank_a, lowrank_b = (tensors[part] for part in LOWRANK_PARTS)
        weight = weight + lowrank_a.float() @ lowrank_b.float()
    return weight


def apply_block_artifact(float_weights: dict[str, torch.Tensor], artifact: BlockArtifact) -> dict[str, torch.Tensor]:
    """Block weights as the quantized model uses them: each quantized layer's weight replaced by
    its dequantized value, and any stored full-tensor override (e.g. tweaked norms) applied."""
    weights = dict(float_weights)
    for record in artifact.layers:
        weights[f"{record.name}.weight"] = stored_weight(artifact.layer_tensors(record.name), record.spec)
    for param, value in artifact.overrides.items():
        weights[param] = value.float()
    return weights


def float_block_hessians(
    arch, config, index: int, weights: dict[str, torch.Tensor], inputs: torch.Tensor, batch_size: int = 8
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The float block's outputs on `inputs` and the input Hessian of each linear group (keyed
    by the group's first layer), all from the unquantized block: what sensitivity scoring needs
    before any bit-width is chosen."""
    from layerquant.solvers.architectures import BlockContext, build_block, run_block

    context = BlockContext(arch, config, seq_len=inputs.shape[1])
    block = build_block(arch, config, index, weights)

    def forward(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return run_block(module, context, index, hidden, batch_size)

    hessians, outputs = collect_hessians(block, forward, inputs, [group[0] for group in arch.linear_groups], batch_size, keep_outputs=True)
    return outputs, hessians
