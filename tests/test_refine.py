"""Scale refinement on a real stories260K block: held-out output error falls, codes stay put."""
from __future__ import annotations

import copy

import pytest
import torch

from layerquant.errors import InvalidSpec
from layerquant.solvers.architectures import family_norm, run_block
from layerquant.solvers.grid import QuantizedWeight, max_code
from layerquant.solvers.norm_tweak import dataset_relative_mse, functional_block_forward
from layerquant.solvers.reconstruct import BlockTuning, quantize_block_sequential, reconstruct_block, stored_weight, tune_block
from layerquant.solvers.refine import refine_scales
from layerquant.specs import QuantSpec
from support.stories_block import BLOCK, one_thread, real_block  # noqa: F401 (fixtures)


def _quantized_outcomes(real_block, spec: QuantSpec):
    """(quantized copy of the block, its layer outcomes) as the flow's block solver makes them."""
    block = copy.deepcopy(real_block["block"])
    context = real_block["context"]
    outcomes = quantize_block_sequential(block, lambda m, h: run_block(m, context, BLOCK, h), real_block["x_train"],
                                         real_block["arch"].linear_groups, {n: spec for n in real_block["arch"].linear_names}).outcomes
    return block, outcomes


def _quantize_with_forward(real_block, spec: QuantSpec):
    """(layer name -> QuantizedWeight as the flow's block solver makes them, the quantized
    block's forward taking those layers' weights)."""
    block, outcomes = _quantized_outcomes(real_block, spec)
    layers = {o.name: QuantizedWeight.from_tensors(o.tensors, spec) for o in outcomes}
    return layers, functional_block_forward(block, [f"{n}.weight" for n in layers], **real_block["kwargs"])


def _weights(layers):
    return {f"{name}.weight": qw.dequantize() for name, qw in layers.items()}


@pytest.mark.parametrize("spec", [QuantSpec(2, 32, False, "gptq", act_order=True, clip_search=True), QuantSpec(3, 32, True, "rtn", act_order=False, clip_search=False)],
                         ids=lambda s: s.label())
def test_refine_lowers_held_out_error_with_codes_fixed(real_block, spec):
    layers, forward = _quantize_with_forward(real_block, spec)
    refined, stats = refine_scales(forward, layers, real_block["x_train"], real_block["y_train"], steps=48, lr=3e-3)
    assert stats.best_loss < 0.95 * stats.initial_loss and stats.best_step > 0
    before = dataset_relative_mse(forward, _weights(layers), real_block["x_test"], real_block["y_test"])
    after = dataset_relative_mse(forward, _weights(refined), real_block["x_test"], real_block["y_test"])
    assert after < 0.92 * before, (before, after)
    for name, qw in refined.items():
        assert torch.equal(qw.codes, layers[name].codes)
        assert torch.equal(qw.zeros, layers[name].zeros)
        assert qw.scales.dtype == torch.float32 and torch.equal(qw.scales.half().float(), qw.scales)  # fp16 storage is exact
        # refinement scales by (1 + delta), delta > -1: no scale changes sign or vanishes
        assert (torch.sign(qw.scales) == torch.sign(layers[name].scales)).all() and (qw.scales != 0).all()
        # what the stored tensors decode to is what was evaluated
        assert torch.equal(stored_weight(qw.to_tensors(), spec), qw.dequantize())
    assert any(not torch.equal(refined[n].scales, layers[n].scales) for n in layers)
    # the reported loss is that of the returned, stored-precision scales
    assert stats.best_loss == pytest.approx(
        dataset_relative_mse(forward, _weights(refined), real_block["x_train"], real_block["y_train"]), rel=1e-9)


def test_zero_points_stay_integers_on_the_grid(real_block):
    spec = QuantSpec(2, 32, False, "gptq", act_order=True, clip_search=True)
    layers, forward = _quantize_with_forward(real_block, spec)
    x, y = real_block["x_train"][:12], real_block["y_train"][:12]
    refined, stats = refine_scales(forward, layers, x, y, steps=12, lr=3e-3, optimize_zeros=True, zero_lr=0.05)
    assert stats.best_loss <= stats.initial_loss
    for name, qw in refined.items():
        assert qw.zeros.dtype == torch.uint8 and int(qw.zeros.max()) <= max_code(spec.bits)
        assert torch.equal(qw.codes, layers[name].codes)
    # symmetric grids have an implied zero: it never moves
    sym = QuantSpec(3, 32, True, "rtn", clip_search=False)
    layers, forward = _quantize_with_forward(real_block, sym)
    refined, _ = refine_scales(forward, layers, x, y, steps=4, lr=3e-3, optimize_zeros=True)
    assert all(torch.equal(refined[n].zeros, layers[n].zeros) for n in layers)


def test_best_seen_and_determinism(real_block):
    spec = QuantSpec(3, 32, True, "rtn", clip_search=False)
    layers, forward = _quantize_with_forward(real_block, spec)
    x, y = real_block["x_train"][:8], real_block["y_train"][:8]
    # a learning rate that wrecks the scales: the unrefined layers come back unchanged
    wrecked, stats = refine_scales(forward, layers, x, y, steps=4, lr=3.0, eval_every=1)
    assert stats.best_step == 0 and all(loss > stats.initial_loss for _, loss in stats.history[1:])
    assert all(torch.equal(wrecked[n].scales, layers[n].scales) for n in layers)
    first, _ = refine_scales(forward, layers, x, y, steps=8, lr=3e-3, batch_size=3, seed=3)
    second, _ = refine_scales(forward, layers, x, y, steps=8, lr=3e-3, batch_size=3, seed=3)
    assert all(torch.equal(first[n].scales, second[n].scales) for n in layers)


def test_bad_arguments(real_block):
    spec = QuantSpec(3, 32, True, "rtn", clip_search=False)
    layers, forward = _quantize_with_forward(real_block, spec)
    x, y = real_block["x_train"][:4], real_block["y_train"][:4]
    with pytest.raises(InvalidSpec, match="same tokens"):
        refine_scales(forward, layers, x, y[:, :5], steps=1)
    with pytest.raises(InvalidSpec, match="out of range"):
        refine_scales(forward, layers, x, y, steps=-1)
    pb = QuantizedWeight(layers["mlp.up_proj"].codes, layers["mlp.up_proj"].scales, layers["mlp.up_proj"].zeros,
                         QuantSpec(method="pbllm", salient_fraction=0.1))
    with pytest.raises(InvalidSpec, match="PB-LLM"):
        refine_scales(forward, {"mlp.up_proj": pb}, x, y, steps=1)


def _tuned_block(real_block, space: str):
    """Block 2 at 2 bits, refined and norm-tweaked with its loss measured in `space`."""
    arch, context = real_block["arch"], real_block["context"]
    block, outcomes = _quantized_outcomes(real_block, QuantSpec(2, 32, False, "gptq", act_order=True, clip_search=True))
    tuning = BlockTuning(refine_steps=40, norm_tweak_steps=40, holdout=0.25, space=space)
    project = family_norm(arch, context.config, real_block["next_norm_weight"]) if space == "next_norm" else None
    _, report = tune_block(block, real_block["kwargs"], arch.norms, outcomes, real_block["x_train"], real_block["y_train"], tuning, project)
    assert report["refine"]["loss_after"] < report["refine"]["loss_before"]
    return block


def test_tuning_in_the_next_norm_space_fits_what_the_next_block_reads(real_block):
    """The next block reads this block's output through its input norm: tuned in that space,
    the block's held-out error as the next block sees it is lower than when tuned on raw outputs."""
    next_norm = family_norm(real_block["arch"], real_block["context"].config, real_block["next_norm_weight"])

    def seen_by_next_block(block) -> float:
        with torch.no_grad():
            out = next_norm(run_block(block, real_block["context"], BLOCK, real_block["x_test"]))
            target = next_norm(real_block["y_test"])
        return float((out - target).pow(2).sum() / target.pow(2).sum())

    residual = seen_by_next_block(_tuned_block(real_block, "residual"))
    in_next_norm_space = seen_by_next_block(_tuned_block(real_block, "next_norm"))
    assert in_next_norm_space < residual, (residual, in_next_norm_space)


def test_next_norm_space_without_the_norm_is_refused(real_block):
    weights = {k: v.detach().clone() for k, v in real_block["block"].state_dict().items()}
    specs = {n: QuantSpec(2, 32) for n in real_block["arch"].linear_names}
    with pytest.raises(InvalidSpec, match="next block's input norm"):
        reconstruct_block(real_block["arch"], real_block["context"].config, BLOCK, weights, real_block["x_train"][:4], specs,
                          tuning=BlockTuning(refine_steps=1, space="next_norm"))
