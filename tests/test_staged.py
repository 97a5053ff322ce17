"""One forward per block: the staged pass, with same-spec layers of a group solved as one
stacked matrix, quantizes every layer exactly as the path it replaced (each group's inputs
recomputed from the block's start, each layer solved alone) does, in every family, while
running the block's forward once."""
from __future__ import annotations

import pytest
import torch

from layerquant.infra.checkpoint import CheckpointReader
from layerquant.solvers import architectures as arch_ops
from layerquant.solvers.gptq import relative_weighted_error
from layerquant.solvers.reconstruct import LayerOutcome, collect_hessians, quantize_block_sequential, quantize_layer, reconstruct_block
from layerquant.solvers.staged import staged_quantize
from layerquant.specs import QuantSpec
from support.stories_block import BLOCK, one_thread, real_block  # noqa: F401 (fixtures)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
SPEC = QuantSpec(bits=3, group_size=32, method="gptq", act_order=True, clip_search=True)


def recomputing_reference(block, forward, inputs, groups, specs, batch_size=8):
    """True-sequential quantization the slow way (the path the staged pass replaced): each
    group's Hessian from a pass from the block's start through the already-quantized earlier
    groups, then each layer solved on its own; then one more pass for the outputs."""
    outcomes = []
    for group in groups:
        names = [n for n in group if n in specs]
        if names:
            hessian = collect_hessians(block, forward, inputs, [names[0]], batch_size)[0][names[0]]
            for name in names:
                linear = block.get_submodule(name)
                weight = linear.weight.detach().float()
                tensors, weight_hat, damp = quantize_layer(weight, hessian, specs[name], 0.01, name)
                error = relative_weighted_error(weight, weight_hat, hessian)
                with torch.no_grad():
                    linear.weight.copy_(weight_hat)
                outcomes.append(LayerOutcome(name, specs[name], tensors, tuple(weight.shape), error, damp, 0.0))
    return outcomes, forward(block, inputs)


def fresh(weights):
    """A copy to build a block from: blocks hold (and quantization overwrites) the tensors given."""
    return {name: tensor.clone() for name, tensor in weights.items()}


def counted_forward(context, index, calls):
    def forward(module, hidden):
        calls.append(hidden.shape[0])
        return arch_ops.run_block(module, context, index, hidden, batch_size=8)

    return forward


def assert_same_quantization(staged, reference):
    assert [o.name for o in staged] == [o.name for o in reference]
    for mine, theirs in zip(staged, reference):
        for part in theirs.tensors:
            assert torch.equal(mine.tensors[part], theirs.tensors[part]), (mine.name, part)
        # the reference measures tr(E H E^T) with products by H; the solve takes it from its own
        # column loop (solvers/gptq.gptq_row_errors): the same value to the factor's accuracy
        assert mine.error == pytest.approx(theirs.error, rel=1e-5)


def test_staged_codes_and_outputs_equal_the_recomputing_path_on_stories(real_block):
    arch, context, inputs = real_block["arch"], real_block["context"], real_block["x_train"]
    specs = {name: SPEC for name in arch.linear_names}
    weights = {k: v.detach().clone() for k, v in real_block["block"].state_dict().items()}

    reference_calls: list[int] = []
    block = arch_ops.build_block(arch, context.config, BLOCK, fresh(weights))
    expected, expected_outputs = recomputing_reference(block, counted_forward(context, BLOCK, reference_calls), inputs,
                                                       arch.linear_groups, specs)
    staged_calls: list[int] = []
    block = arch_ops.build_block(arch, context.config, BLOCK, fresh(weights))
    result = quantize_block_sequential(block, counted_forward(context, BLOCK, staged_calls), inputs, arch.linear_groups, specs)

    assert_same_quantization(result.outcomes, expected)
    assert torch.equal(result.outputs, expected_outputs)
    # 32 samples in batches of 8: one call per batch, against a pass per group plus the outputs
    assert staged_calls == [8] * 4
    assert reference_calls == [8] * 4 * len(arch.linear_groups) + [32]
    assert set(result.seconds) == {"forward", "hessian", "solve"}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_staged_equals_recomputing_in_every_family(model_type, tiny_model_dir):
    """Gemma 3's extra norms, q/k norms and its sliding window, Qwen3's q/k norms: the paused
    forward is the family's own module, so every stage is what transformers computes."""
    reader = CheckpointReader(str(tiny_model_dir(model_type)))
    torch.manual_seed(1)
    inputs = torch.randn(12, 40, reader.config.hidden_size)  # 12 samples: a ragged last batch of 4
    context = arch_ops.BlockContext(reader.arch, reader.config, seq_len=inputs.shape[1])
    specs = {name: SPEC for name in reader.arch.linear_names if name != "self_attn.k_proj"}  # k stays float
    for index in range(reader.n_blocks):
        weights = {k: v.float() for k, v in reader.block_weights(index).items()}
        block = arch_ops.build_block(reader.arch, reader.config, index, fresh(weights))
        expected, expected_outputs = recomputing_reference(block, counted_forward(context, index, []), inputs, reader.arch.linear_groups, specs)
        block = arch_ops.build_block(reader.arch, reader.config, index, fresh(weights))
        result = quantize_block_sequential(block, counted_forward(context, index, []), inputs, reader.arch.linear_groups, specs)
        assert_same_quantization(result.outcomes, expected)
        assert torch.equal(result.outputs, expected_outputs)
        assert torch.equal(block.self_attn.k_proj.weight, weights["self_attn.k_proj.weight"])


def test_dropping_passed_groups_weights_changes_nothing_but_memory(real_block):
    """An untuned block is not run after its pass, so each group's weights are freed once every
    batch has passed it: same codes and outputs, and only the last group's weights are left."""
    arch, context, inputs = real_block["arch"], real_block["context"], real_block["x_train"]
    specs = {name: SPEC for name in arch.linear_names}
    weights = {k: v.detach().clone() for k, v in real_block["block"].state_dict().items()}
    kept_block = arch_ops.build_block(arch, context.config, BLOCK, fresh(weights))
    kept = quantize_block_sequential(kept_block, counted_forward(context, BLOCK, []), inputs, arch.linear_groups, specs)
    dropping_block = arch_ops.build_block(arch, context.config, BLOCK, fresh(weights))
    dropped = quantize_block_sequential(dropping_block, counted_forward(context, BLOCK, []), inputs, arch.linear_groups, specs,
                                        drop_passed_weights=True)
    assert_same_quantization(dropped.outcomes, kept.outcomes)
    assert torch.equal(dropped.outputs, kept.outputs)
    *passed, last = arch.linear_groups
    assert all(dropping_block.get_submodule(name).weight.numel() == 0 for group in passed for name in group)
    assert all(torch.equal(dropping_block.get_submodule(name).weight, kept_block.get_submodule(name).weight) for name in last)


def test_reconstruct_block_runs_one_forward_and_measures_error_on_a_subset(real_block):
    arch, context, inputs = real_block["arch"], real_block["context"], real_block["x_train"]
    weights = {k: v.detach().clone() for k, v in real_block["block"].state_dict().items()}
    specs = {name: SPEC for name in arch.linear_names}
    plain = reconstruct_block(arch, context.config, BLOCK, fresh(weights), inputs, specs)
    assert plain.forwards == pytest.approx(1 + 4 / 32)
    assert plain.output_error_samples == 4
    full = reconstruct_block(arch, context.config, BLOCK, fresh(weights), inputs, specs, full_output_error=True)
    assert full.forwards == 2.0 and full.output_error_samples == 32
    assert torch.equal(plain.outputs, full.outputs)
    # the subset's error estimates the whole set's: same order of magnitude on real text
    assert 0.3 < plain.output_error / full.output_error < 3.0
    assert set(plain.timing) >= {"forward", "hessian", "solve"}


def test_a_failing_group_leaves_no_paused_forward_and_no_hooks(real_block):
    arch, context, inputs = real_block["arch"], real_block["context"], real_block["x_train"]
    weights = {k: v.detach().clone() for k, v in real_block["block"].state_dict().items()}
    block = arch_ops.build_block(arch, context.config, BLOCK, fresh(weights))

    def fail_on_mlp(names, hessian):
        if names[0].startswith("mlp"):
            raise ValueError("solver failed")

    with pytest.raises(ValueError, match="solver failed"):
        staged_quantize(block, counted_forward(context, BLOCK, []), inputs, arch.linear_groups, fail_on_mlp)
    assert all(not m._forward_pre_hooks for m in block.modules())
    assert torch.is_grad_enabled()  # the unwound forwards restored the caller's grad mode
    # the block still runs normally afterwards
    assert arch_ops.run_block(block, context, BLOCK, inputs[:2]).shape == inputs[:2].shape


def test_a_group_the_forward_never_reaches_is_an_error(real_block):
    arch, context, inputs = real_block["arch"], real_block["context"], real_block["x_train"]
    weights = {k: v.detach().clone() for k, v in real_block["block"].state_dict().items()}
    block = arch_ops.build_block(arch, context.config, BLOCK, fresh(weights))
    block.extra = torch.nn.Linear(4, 4)  # a linear the block's forward never calls
    with pytest.raises(RuntimeError, match="never reached extra"):
        staged_quantize(block, counted_forward(context, BLOCK, []), inputs, [["extra"]], lambda names, h: None)


def test_the_device_path_computes_what_the_host_path_computes(real_block):
    """`device=` moves weights, batches and solves (through torch's default-device context) and
    hands results back on the host; on the CPU it must change no bit. CI has no GPU: the CUDA
    run of the same code is bench/gpu_quantize.py."""
    arch, context, inputs = real_block["arch"], real_block["context"], real_block["x_train"]
    weights = {k: v.detach().clone() for k, v in real_block["block"].state_dict().items()}
    specs = {name: SPEC for name in arch.linear_names}
    host = reconstruct_block(arch, context.config, BLOCK, fresh(weights), inputs, specs)
    moved = reconstruct_block(arch, context.config, BLOCK, fresh(weights), inputs, specs, device="cpu")
    assert_same_quantization(moved.outcomes, host.outcomes)
    assert torch.equal(moved.outputs, host.outputs) and moved.output_error == host.output_error


def test_cuda_asked_for_without_a_gpu_is_a_clear_error():
    from layerquant.errors import InvalidSpec
    from layerquant.solvers.reconstruct import resolve_device

    assert resolve_device("cpu") is None
    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda"
    else:
        assert resolve_device("auto") is None
        with pytest.raises(InvalidSpec, match="no usable CUDA device"):
            resolve_device("cuda")


def test_only_neighbours_with_the_same_grid_spec_share_a_solve():
    from layerquant.solvers.reconstruct import _same_spec_runs

    w3, w4 = SPEC, QuantSpec(bits=4, group_size=32, method="gptq", act_order=True, clip_search=True)
    pbllm = QuantSpec(bits=2, group_size=32, method="pbllm", salient_fraction=0.1)
    assert _same_spec_runs(["q", "k", "v"], {"q": w4, "k": w3, "v": w3}) == [["q"], ["k", "v"]]
    assert _same_spec_runs(["gate", "up"], {"gate": pbllm, "up": pbllm}) == [["gate"], ["up"]]
    assert _same_spec_runs(["q", "k", "v"], {"q": w3, "k": w4, "v": w3}) == [["q"], ["k"], ["v"]]
