"""Hessian collection on a real block: the early-stopped, float32-batch path gives the Hessians
a full float64 pass gives, and the float pass that also returns outputs returns the block's."""
from __future__ import annotations

import pytest
import torch

from layerquant.errors import HessianNotPositiveDefinite
from layerquant.solvers.architectures import run_block
from layerquant.solvers.hessian import damped_inverse_cholesky
from layerquant.solvers.reconstruct import collect_hessians
from support.stories_block import BLOCK, one_thread, real_block  # noqa: F401 (fixtures)


def reference_hessians(block, forward, inputs, names) -> dict[str, torch.Tensor]:
    """2/n * sum x x^T in float64 over a full forward of every sample, straight from the hooks."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [block.get_submodule(name).register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].detach()))
               for name in names]
    try:
        forward(block, inputs)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, chunks in seen.items():
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).double()
        out[name] = 2.0 / x.shape[0] * x.T @ x
    return out


def test_early_stopped_hessians_match_a_full_float64_pass(real_block):
    block, arch, context, inputs = real_block["block"], real_block["arch"], real_block["context"], real_block["x_train"]
    calls = []

    def forward(module, hidden):
        calls.append(hidden.shape[0])
        return run_block(module, context, BLOCK, hidden, batch_size=hidden.shape[0])

    names = [group[0] for group in arch.linear_groups]
    expected = reference_hessians(block, forward, inputs, names)
    for name in names:
        # one layer at a time, as true-sequential quantization asks: each pass stops at that layer
        hessians, outputs = collect_hessians(block, forward, inputs, [name], batch_size=8)
        assert outputs is None and list(hessians) == [name]
        hessian = hessians[name]
        error = (hessian.double() - expected[name]).norm() / expected[name].norm()
        assert error < 1e-6, (name, float(error))
    assert calls[1:] == [8] * (4 * len(names))  # 32 samples in batches of 8, every pass

    together, outputs = collect_hessians(block, forward, inputs, names, batch_size=8, keep_outputs=True)
    reference_outputs = real_block["y_train"]
    reference_outputs = reference_outputs[0] if isinstance(reference_outputs, tuple) else reference_outputs
    assert torch.allclose(outputs, reference_outputs, rtol=1e-5, atol=1e-5)
    for name in names:
        assert torch.allclose(together[name].double(), expected[name], rtol=1e-5, atol=1e-7 * float(expected[name].abs().max()))


def test_a_pass_stops_at_its_layer(real_block):
    """Asking for the MLP's input Hessian must not run down_proj: the rest of the block is skipped."""
    block, arch, context, inputs = real_block["block"], real_block["arch"], real_block["context"], real_block["x_train"]
    ran = []
    handle = block.get_submodule("mlp.down_proj").register_forward_pre_hook(lambda *_: ran.append(1))
    try:
        collect_hessians(block, lambda m, h: run_block(m, context, BLOCK, h), inputs, ["mlp.gate_proj"], batch_size=8)
        assert ran == []
        collect_hessians(block, lambda m, h: run_block(m, context, BLOCK, h), inputs, ["mlp.gate_proj"], batch_size=8, keep_outputs=True)
        assert len(ran) == 4
    finally:
        handle.remove()


def test_a_consumed_hessian_gives_the_same_factor_and_is_freed(real_block):
    """`consume=True` damps the caller's Hessian in place and frees it once factored (the
    factorization's peak drops from three Hessian-sized buffers to two): the factor, the damping
    and its shift are the same to the bit, in natural and in act_order's column order."""
    block, arch, context, inputs = real_block["block"], real_block["arch"], real_block["context"], real_block["x_train"]
    name = arch.linear_groups[-1][0]  # down_proj: the widest input
    hessian = reference_hessians(block, lambda m, h: run_block(m, context, BLOCK, h, batch_size=8), inputs, [name])[name].float()
    for perm in (None, torch.argsort(torch.diag(hessian), descending=True, stable=True)):
        kept = hessian.clone()
        expected = damped_inverse_cholesky(kept, 0.01, name, perm=perm)
        assert torch.equal(kept, hessian)  # not consumed: the caller's Hessian is untouched
        handed = hessian.clone()
        factor, damp, shift = damped_inverse_cholesky(handed, 0.01, name, perm=perm, consume=True)
        assert torch.equal(factor, expected[0]) and (damp, shift) == expected[1:]
        assert handed.untyped_storage().nbytes() == 0


def test_damping_grows_until_the_hessian_factors_consumed_or_not(real_block):
    """An indefinite Hessian (the real one shifted below zero) needs more damping than asked:
    both ways find the same damping and the same factor; a Hessian no damping can fix is a typed
    error either way."""
    block, arch, context, inputs = real_block["block"], real_block["arch"], real_block["context"], real_block["x_train"]
    name = arch.linear_groups[0][0]
    hessian = reference_hessians(block, lambda m, h: run_block(m, context, BLOCK, h, batch_size=8), inputs, [name])[name].float()
    smallest = torch.linalg.eigvalsh(hessian.double()).min().item()
    shifted = hessian - (smallest + 0.02 * torch.diag(hessian).mean().item()) * torch.eye(hessian.shape[0])
    expected = damped_inverse_cholesky(shifted.clone(), 0.01, name)
    assert expected[1] == pytest.approx(0.1)  # 1% is not enough for a 2%-of-the-mean negative eigenvalue; 10% is
    factor, damp, shift = damped_inverse_cholesky(shifted.clone(), 0.01, name, consume=True)
    assert torch.equal(factor, expected[0]) and (damp, shift) == expected[1:]
    hopeless = -torch.eye(8)
    for consume in (False, True):
        with pytest.raises(HessianNotPositiveDefinite):
            damped_inverse_cholesky(hopeless.clone(), 0.01, "hopeless", max_attempts=3, consume=consume)
