"""Hessian of a linear layer's reconstruction loss, H = 2/n * sum x x^T, streamed over samples."""
from __future__ import annotations

import torch

from layerquant.errors import HessianNotPositiveDefinite


def accumulate_hessian(hessian: torch.Tensor | None, n_seen: int, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold one batch of layer inputs ([..., in_features]) into a running-mean Hessian.

    Kept as a running mean (not a sum) in float64 so that long calibration runs neither
    overflow nor lose small contributions. The batch's own Gram matrix is formed in float32:
    a batch is a few thousand rows, whose float32 sum is good to ~1e-6 relative (GPTQ factors
    in float32 anyway), and the float64 product was a sixth of a block's quantization time.
    """
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
    n_new = x.shape[0]
    if hessian is None:
        hessian = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    total = n_seen + n_new
    # in place: no full-size float64 temporaries (a 4096-wide float64 Hessian is 134 MB)
    hessian.mul_(n_seen / total).add_(x.T @ x, alpha=2.0 / total)
    return hessian, total


def damped_inverse_cholesky(
    hessian: torch.Tensor, damp_percent: float, layer: str, max_attempts: int = 6
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1 after damping; damping grows x10 until H is positive definite.

    Dead inputs (zero diagonal: a channel that never fires) get a unit diagonal so they cannot
    make H singular; GPTQ zeroes their weight columns separately.
    Works in the Hessian's dtype (GPTQ factors in float32; damping absorbs the rounding).
    Returns the factor and the damping fraction that worked.
    """
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    diagonal = torch.diag(h).clone()
    mean_diag = diagonal.mean().item()
    damp = damp_percent
    for _ in range(max_attempts):
        # damp in place and factor into fresh buffers one at a time: a 4096-wide float64
        # Hessian is 134 MB, and holding five copies of it dominated a block's peak memory
        h.diagonal().copy_(diagonal + damp * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper, damp
        damp *= 10
    raise HessianNotPositiveDefinite(layer, damp / 10)
