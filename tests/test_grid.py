"""The clipping search of the integer grid: the chunked error sums pick the shrink factor that the
plain definition (torch's fused fake-quantization and the CLIP_NORM norm, per factor) picks."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from layerquant.solvers.grid import CLIP_NORM, CLIP_SHRINKS, _grid_from_range, fit_grid, max_code, quantize_codes


def chosen_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row CLIP_NORM norm of the rounding error on one grid, by torch's fused fake-quantization."""
    rounded = torch.fake_quantize_per_channel_affine(w, scale, zero.to(torch.int32), 0, 0, max_code(bits))
    return torch.linalg.vector_norm(rounded - w, ord=CLIP_NORM, dim=1)


def reference_errors(w: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """[shrinks, rows]: `chosen_error` of every shrink factor's grid, one fused pass per factor."""
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    return torch.stack([chosen_error(w, *_grid_from_range(lo * shrink, hi * shrink, bits, sym), bits) for shrink in CLIP_SHRINKS])


@pytest.fixture(scope="module")
def weight_groups(stories_model) -> dict[str, torch.Tensor]:
    """Groups of real weights (every linear of stories260K, 32 wide) and of a heavy-tailed matrix
    (128 wide) whose outliers make clipping worth it, one group per row as fit_groups views them."""
    state = load_file(f"{stories_model}/model.safetensors")
    real = torch.cat([t.float().reshape(-1, 32) for name, t in state.items() if name.endswith("proj.weight")])
    torch.manual_seed(0)  # the same heavy-tailed draw every run
    heavy = torch.distributions.StudentT(2.5).sample((3000, 128))
    return {"stories260K": real, "student-t": heavy}


@pytest.mark.parametrize("bits,sym", [(4, True), (3, True), (3, False), (2, False)])
def test_clip_search_picks_the_least_error_shrink_of_the_reference(weight_groups, bits, sym):
    for name, w in weight_groups.items():
        reference = reference_errors(w, bits, sym)
        scale, zero = fit_grid(w, bits, sym, clip_search=True)
        picked = chosen_error(w, scale, zero, bits)
        best = reference.min(dim=0).values
        # the grid it keeps is the best of the factors, up to float rounding of near-equal sums
        assert torch.allclose(picked, best, rtol=1e-5, atol=1e-12), name
        # and it is the same factor for all but a few rows (those whose sums tie within rounding)
        picked_factor = (reference - picked[None]).abs().argmin(dim=0)
        assert (picked_factor == reference.argmin(dim=0)).float().mean() > 0.999, name
        # and clipping was used: somewhere a shrunk range beats absmax / min-max by a clear margin
        plain = chosen_error(w, *fit_grid(w, bits, sym, clip_search=False), bits)
        assert (picked <= plain * (1 + 1e-6)).all() and (picked < 0.95 * plain).any(), name


def test_clip_search_handles_zero_rows_and_ragged_chunks():
    w = torch.randn(1001, 96, generator=torch.Generator().manual_seed(1))
    w[7] = 0.0
    scale, zero = fit_grid(w, 3, False, clip_search=True)
    assert scale.shape == (1001,) and torch.isfinite(scale).all() and scale[7] == 1.0 and zero[7] == 0.0
    assert torch.equal(scale, fit_grid(w.T.contiguous().T, 3, False, clip_search=True)[0])  # strided input, same grid


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_puts_the_largest_weight_on_the_outer_level(weight_groups, bits):
    w = weight_groups["stories260K"]
    scale, zero = fit_grid(w, bits, sym=True, clip_search=False)
    half = 1 << (bits - 1)
    assert (zero == half).all()
    rows = torch.arange(w.shape[0])
    extreme = w[rows, w.abs().argmax(dim=1)]
    # the scale's sign mirrors the grid for a positive extreme, which then decodes to itself
    # (up to the scale's fp16 rounding) on the level q = 0, i.e. q - zero = -2**(bits-1)
    assert (torch.sign(scale) == -torch.sign(extreme)).all()
    codes = quantize_codes(w, scale[:, None], zero[:, None], bits)
    decoded = scale * (codes[rows, w.abs().argmax(dim=1)] - zero)
    assert torch.allclose(decoded, extreme, rtol=1e-3, atol=0)
    # and it beats the unsigned absmax / ((2**bits - 1) / 2) grid, which leaves half a step unused
    # on each side, on real weights
    unsigned = (w.abs().amax(dim=1) / (max_code(bits) / 2)).half().float()
    unsigned_codes = quantize_codes(w, unsigned[:, None], zero[:, None], bits)
    error = (scale[:, None] * (codes - zero[:, None]) - w).pow(2).sum()
    unsigned_error = (unsigned[:, None] * (unsigned_codes - zero[:, None]) - w).pow(2).sum()
    assert error < 0.95 * unsigned_error, (float(error), float(unsigned_error))
