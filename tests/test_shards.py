"""Data-parallel calibration shards: the Hessians merged from 1, 2 or 4 shards of the samples
are bit-identical (a fixed summation tree over global batch indices), and so are the GPTQ
codes solved from them and the block's outputs."""
from __future__ import annotations

import re

import pytest
import torch

from layerquant.config import RunConfig
from layerquant.solvers import architectures as arch_ops
from layerquant.solvers.hessian import GramPanels, PairwiseSum, gram_panels, hessian_from_sum, merge_partials, shard_batches, symmetric_gram
from layerquant.solvers.reconstruct import quantize_block_sequential, solve_unit, solve_units
from layerquant.solvers.sharded import merged_hessian, set_weights, shard_sample_ranges, start_shard
from layerquant.specs import QuantSpec
from support.stories_block import BLOCK, one_thread, real_block  # noqa: F401 (fixtures)

SPEC = QuantSpec(bits=3, group_size=32, method="gptq", act_order=True)


@pytest.mark.parametrize("width", [64, 640, 1000, 2048])
def test_the_panelled_gram_is_x_transpose_x_to_the_bit_and_symmetric(width):
    torch.manual_seed(width)
    x = torch.randn(1024, width) * torch.rand(width) * 5  # columns of different scales
    gram = symmetric_gram(x)
    assert torch.equal(gram, x.T @ x)
    assert torch.equal(gram, gram.T)


def test_gram_panels_sum_and_scale_to_the_full_matrices_bits_in_less_memory():
    torch.manual_seed(0)
    batches = [torch.randn(300, 1100) * torch.rand(1100) * 5 for _ in range(3)]
    panel_tree, full_tree = PairwiseSum(), PairwiseSum()
    for x in batches:
        panel_tree.add(gram_panels(x))
        full_tree.add(symmetric_gram(x).double())
    panels, full = panel_tree.total(), full_tree.total()
    assert panels.dtype == torch.float64 and len(panels.panels) == 3
    assert torch.equal(panels.full(), full)
    assert torch.equal(hessian_from_sum(panels.clone(), 900), full.clone().mul_(2 / 900).float())
    assert sum(panel.numel() for panel in panels.panels) < 0.7 * 1100**2  # (p + 1) / 2p of the matrix
    stored = GramPanels.from_tensors(panels.tensors())
    assert all(torch.equal(a, b) for a, b in zip(stored.panels, panels.panels))


def test_pairwise_sum_is_the_same_tree_for_every_aligned_split():
    torch.manual_seed(0)
    # magnitudes far apart: a different summation order changes the low bits
    leaves = [torch.randn(4, 4, dtype=torch.float64) * 10.0 ** (i % 7) for i in range(11)]
    tree = PairwiseSum()
    for leaf in leaves:
        tree.add(leaf.clone())
    whole = tree.total()
    sequential = sum(leaf.clone() for leaf in leaves)
    assert not torch.equal(whole, sequential)  # the order matters, so the test can fail
    for n_shards in (1, 2, 4, 8, 16):
        partials = []
        for shard in range(n_shards):
            part = PairwiseSum()
            for b in shard_batches(len(leaves), n_shards, shard):
                part.add(leaves[b].clone())
            partials.append(part.total())
        assert torch.equal(merge_partials(partials), whole), n_shards
    with pytest.raises(ValueError, match="power of two"):
        shard_batches(11, 3, 0)


def run_sharded(arch, context, weights, inputs, n_shards):
    """The block quantized by `n_shards` shards in one process, as the cluster's tasks do it."""
    specs = {name: SPEC for name in arch.linear_names}
    groups = arch.linear_groups
    shards = [start_shard(arch, context.config, BLOCK, {k: v.clone() for k, v in weights.items()}, inputs[a:b], groups, {}, 0)
              for a, b in shard_sample_ranges(inputs.shape[0], 8, n_shards)]
    codes, hessian_sums = {}, []
    for g, names in enumerate(groups):
        parts = [shard.run_to(g) for shard in shards]
        rows = sum(r for _, r in parts)
        hessian_sums.append(merge_partials([None if p is None else p.clone() for p, _ in parts]))
        solved = {}
        for run in solve_units(names, specs):
            float_w = [weights[f"{name}.weight"].float() for name in run]
            hessian = merged_hessian(run, [p for p, _ in parts], rows)
            for outcome, weight_hat in solve_unit(run, float_w, hessian, SPEC, 0.01, ""):
                codes[outcome.name] = outcome.tensors
                solved[outcome.name] = weight_hat
        for shard in shards:
            set_weights(shard.block, solved)
    outputs = torch.cat([o for o in (shard.finish() for shard in shards) if o is not None])
    return hessian_sums, codes, outputs


def test_one_two_and_four_shards_give_the_same_hessians_codes_and_outputs(real_block):
    arch, context, inputs = real_block["arch"], real_block["context"], real_block["x_train"][:28]  # a ragged last batch
    weights = {k: v.detach().clone() for k, v in real_block["block"].state_dict().items()}
    one = run_sharded(arch, context, weights, inputs, 1)
    # the in-process staged pass is the one-shard case
    block = arch_ops.build_block(arch, context.config, BLOCK, {k: v.clone() for k, v in weights.items()})
    staged = quantize_block_sequential(block, lambda m, h: arch_ops.run_block(m, context, BLOCK, h, 8), inputs, arch.linear_groups,
                                       {name: SPEC for name in arch.linear_names})
    for outcome in staged.outcomes:
        for part, tensor in outcome.tensors.items():
            assert torch.equal(one[1][outcome.name][part], tensor), (outcome.name, part)
    assert torch.equal(one[2], staged.outputs)
    for n_shards in (2, 4):
        hessians, codes, outputs = run_sharded(arch, context, weights, inputs, n_shards)
        assert all(torch.equal(a.full(), b.full()) for a, b in zip(hessians, one[0])), n_shards
        for name, tensors in one[1].items():
            for part, tensor in tensors.items():
                assert torch.equal(codes[name][part], tensor), (n_shards, name, part)
        assert torch.equal(outputs, one[2])


def test_row_chunks_solved_apart_assemble_to_the_unit_solved_in_one_call(real_block, monkeypatch):
    """A cluster solves a unit's row chunks in separate tasks (`solve_unit_rows` with a row
    range each); assembled, they are the in-process solve to the bit: codes, weights, error."""
    from layerquant.solvers import reconstruct

    monkeypatch.setattr(reconstruct, "SOLVE_CHUNK_ROWS", 48)  # q/k/v stacked: 128 rows in chunks 48 + 48 + 32
    inputs = real_block["x_train"][:16]
    weights = {k: v.detach().float().clone() for k, v in real_block["block"].state_dict().items()}
    run = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    layer_weights = [weights[f"{name}.weight"] for name in run]
    with torch.no_grad():
        x = real_block["block"].input_layernorm(inputs).reshape(-1, inputs.shape[-1])
    hessian = (2 * x.T.double() @ x.double() / inputs.shape[0]).float()
    assert [w.shape[0] for w in layer_weights] == [64, 32, 32]
    whole = solve_unit(run, layer_weights, hessian, SPEC, 0.01, "")
    assert reconstruct.solve_chunks(128, SPEC) == [(0, 48), (48, 96), (96, 128)]
    for ranges in ([(0, 48), (48, 128)], [(0, 96), (96, 128)], [(96, 128), (0, 48), (48, 96)]):
        pieces = [p for rows in ranges for p in reconstruct.solve_unit_rows(run, layer_weights, hessian, SPEC, 0.01, "", rows)]
        assert len(pieces) == 4  # q cut at row 48; k and q's last rows share the second chunk; v the third
        for (outcome, weight_hat), (expected, expected_hat) in zip(reconstruct.assemble_unit(run, SPEC, pieces), whole):
            assert torch.equal(weight_hat, expected_hat) and outcome.error == expected.error, (ranges, outcome.name)
            assert all(torch.equal(outcome.tensors[part], t) for part, t in expected.tensors.items())
    # chunking is GPTQ's rows on their own: the codes are as good as one solve's (here the same)
    monkeypatch.setattr(reconstruct, "SOLVE_CHUNK_ROWS", 1024)
    unchunked = solve_unit(run, layer_weights, hessian, SPEC, 0.01, "")
    for (outcome, _), (reference, _) in zip(whole, unchunked):
        assert abs(outcome.error - reference.error) <= 1e-3 * reference.error, outcome.name
    with pytest.raises(ValueError, match="do not cover"):
        reconstruct.assemble_unit(run, SPEC, reconstruct.solve_unit_rows(run, layer_weights, hessian, SPEC, 0.01, "", (0, 48)))


@pytest.mark.parametrize("bits", [4, 2])
def test_the_solve_measures_its_error_from_its_own_column_loop(real_block, bits):
    """GPTQ's relative error tr(E H E^T) / tr(W H W^T) from the loop's scaled errors and a
    triangular solve (no product by H) is the directly computed one, with dead inputs too."""
    from layerquant.solvers.gptq import relative_weighted_error

    inputs = real_block["x_train"][:16]
    with torch.no_grad():
        x = real_block["block"].input_layernorm(inputs).reshape(-1, inputs.shape[-1]).double()
    hessian = (2 * x.T @ x / x.shape[0]).float()
    hessian[:, 5] = hessian[5, :] = 0.0  # an input channel that never fired
    run = ["self_attn.q_proj", "self_attn.k_proj"]
    weights = [real_block["block"].get_submodule(name).weight.detach().float() for name in run]
    spec = QuantSpec(bits=bits, group_size=32, method="gptq", act_order=True)
    for (outcome, weight_hat), weight in zip(solve_unit(run, weights, hessian, spec, 0.01, ""), weights):
        assert outcome.error == pytest.approx(relative_weighted_error(weight, weight_hat, hessian), rel=1e-5), outcome.name


def test_bad_cluster_settings_are_clear_errors():
    """Checked when the config is read, before any cluster starts."""
    from layerquant.errors import InvalidSpec

    with pytest.raises(InvalidSpec, match="power of two"):
        RunConfig.from_sources(None, shards=3)
    with pytest.raises(InvalidSpec, match=re.escape("tcp://host:8786")):
        RunConfig.from_sources(None, dask_address="localhost:8786")
    with pytest.raises(InvalidSpec, match="--budget"):
        RunConfig.from_sources(None, workers=2, budget=3.5).check_cluster_support()
    with pytest.raises(InvalidSpec, match="both --workers and --dask-address"):
        RunConfig.from_sources(None, workers=2, dask_address="tcp://127.0.0.1:8786").check_cluster_support()
