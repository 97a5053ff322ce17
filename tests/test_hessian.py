"""Hessian collection on a real block: the early-stopped, float32-batch path gives the Hessians
a full float64 pass gives, and the float pass that also returns outputs returns the block's."""
from __future__ import annotations

import torch

from layerquant.solvers.architectures import run_block
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
