"""Settings of the tuning that follows a block's quantization (scale refinement, norm tweaking).

Core rather than solvers: the run config builds these settings and the block's artifact key
includes them, neither of which may depend on the math that uses them (solvers/reconstruct.py).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockTuning:
    """What runs after a block's layers are quantized, each step fitted to the float block's
    outputs on the same inputs: AdaQuant-style scale refinement (codes stay on their grid),
    then norm tweaking. Zero steps switch a step off.

    The defaults are the run's defaults (RunConfig reads them from here) and those of the
    solver functions (`refine_scales`, `tweak_norms`), so a step called without options does
    what a run does."""

    refine_steps: int = 0
    refine_lr: float = 3e-3
    norm_tweak_steps: int = 0
    norm_tweak_lr: float = 3e-3
    # "mse" (relative output MSE) rather than the paper's channel statistics: after GPTQ on
    # stories260K, L_dist made 2-bit perplexity worse (30.3 -> 31.9) while MSE lowered it (23.2)
    norm_tweak_loss: str = "mse"
    batch_size: int = 4
    seed: int = 0
    # share of the calibration samples held out to choose each step's best iterate: on
    # stories260K, choosing on the training samples (0) kept norm tweaks that raised perplexity
    holdout: float = 0.25
    # "residual": the loss compares block outputs; "next_norm": it compares them after the
    # next block's input norm (the caller passes that norm to `reconstruct_block`). Gemma 3
    # keeps 53-96% of its residual energy in one channel that the next norm scales ~10-50x
    # below its median channel, so a residual loss spends the tuning on a channel hardly read:
    # 2-bit refinement there went 289 -> 438 in the residual space, 289 -> 215 in this one
    space: str = "next_norm"
    # BiSup's parameter-efficient fine-tuning: a rank-r correction per quantized linear (float16
    # factors, counted in the layer's bits), trained with the scales in the refinement step;
    # 0 = none. Its lr is a relative step, as refine_lr is (solvers/refine.py)
    lowrank_rank: int = 0
    # with activation quantization: one clipping ratio per quantized input (shared by the
    # linears reading it), trained with the scales in the refinement step (LSQ-style gradient)
    act_clip: bool = False
    act_clip_lr: float = 1e-2
    lowrank_lr: float = 1e-2  # W3A3 rotated, rank 2, 50 steps: 17.83 at 1e-3, 16.74 at 1e-2, 16.25 at 3e-2 (rank 1: 17.52, 17.74)

    @property
    def enabled(self) -> bool:
        return self.refine_steps > 0 or self.norm_tweak_steps > 0

    def identity(self) -> dict:
        """The settings that change the result (empty when nothing runs, so plain runs keep their keys)."""
        out: dict = {}
        if self.refine_steps:
            out["refine"] = {"steps": self.refine_steps, "lr": self.refine_lr}
        if self.norm_tweak_steps:
            out["norm_tweak"] = {"steps": self.norm_tweak_steps, "lr": self.norm_tweak_lr, "loss": self.norm_tweak_loss}
        if self.refine_steps and self.lowrank_rank:  # absent when off: runs from before keep their keys
            out["lowrank"] = {"rank": self.lowrank_rank, "lr": self.lowrank_lr}
        if self.refine_steps and self.act_clip:
            out["act_clip"] = {"lr": self.act_clip_lr}
        if out:
            out |= {"batch_size": self.batch_size, "seed": self.seed, "holdout": self.holdout}
            if self.space != "residual":  # absent when residual: runs from before spaces existed keep their keys
                out["space"] = self.space
        return out


# a layer's low-rank correction, stored next to its codes as two float16 factors
# (correction = lowrank_a @ lowrank_b, [out, r] @ [r, in]); see solvers/refine.py
LOWRANK_PARTS = ("lowrank_a", "lowrank_b")
LOWRANK_BITS = 16  # float16 factors


def has_lowrank_correction(tensors) -> bool:
    return any(part in tensors for part in LOWRANK_PARTS)


def lowrank_storage_bits(tensors) -> int:
    """Bits the layer's low-rank correction adds to its storage (0 without one)."""
    return sum(LOWRANK_BITS * tensors[part].numel() for part in LOWRANK_PARTS if part in tensors)
