"""Typed errors. Every error says what went wrong and what the user should do about it.

The CLI prints `str(error)` as one line and exits non-zero; nothing else is needed to act on it.
"""
from __future__ import annotations


class LayerquantError(Exception):
    """Base class: a problem the user can fix. `hint` says how."""

    exit_code = 2
    transient = False  # True: retrying the same operation later may succeed

    def __init__(self, message: str, hint: str = ""):
        self.message = message
        self.hint = hint
        super().__init__(f"{message}{' — ' + hint if hint else ''}")


class InvalidSpec(LayerquantError):
    """A quantization spec or recipe value is out of range."""


class InvalidModel(LayerquantError):
    """The model folder is missing, incomplete or corrupt."""


class UnsupportedArchitecture(LayerquantError):
    def __init__(self, model_type: str, supported: list[str]):
        self.model_type = model_type
        self.supported = sorted(supported)
        super().__init__(
            f"unsupported model_type {model_type!r}",
            f"layerquant supports: {', '.join(self.supported)}",
        )


class CalibrationError(LayerquantError):
    """Calibration or evaluation text is missing, empty or too short."""


class HessianNotPositiveDefinite(LayerquantError):
    def __init__(self, layer: str, damp: float):
        self.layer = layer
        self.damp = damp
        super().__init__(
            f"Hessian of {layer} is not positive definite even with damping {damp:g}",
            "use more or more varied calibration samples (--nsamples), or raise the recipe's damp_percent",
        )


class InfeasibleBudget(LayerquantError):
    def __init__(self, budget: float, min_achievable: float, unit: str = "bits/weight"):
        self.budget = budget
        self.min_achievable = min_achievable
        super().__init__(
            f"budget {budget:g} {unit} cannot be met by the candidate specs",
            f"the smallest achievable is {min_achievable:.4f} {unit}: raise the budget or add smaller candidates",
        )


class ArtifactCorrupt(LayerquantError):
    def __init__(self, uri: str, expected: str, actual: str):
        self.uri = uri
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"artifact {uri} is corrupt (sha256 {actual[:12]}…, expected {expected[:12]}…)",
            "it has been discarded; re-run to recompute it",
        )


class ArtifactMissing(LayerquantError):
    """A referenced artifact is not in the store."""


class ArtifactMalformed(LayerquantError):
    """A stored artifact's bytes verify but its layout is not the one this code reads."""



class QualityGateFailed(LayerquantError):
    """The quantized model misses the recipe's end-to-end quality bound."""

    exit_code = 3

    def __init__(self, ppl_fp: float, ppl_quant: float, max_increase: float):
        self.ppl_fp, self.ppl_quant, self.max_increase = ppl_fp, ppl_quant, max_increase
        super().__init__(
            f"perplexity rose {100 * (ppl_quant / ppl_fp - 1):.2f}% ({ppl_fp:.4f} -> {ppl_quant:.4f}), "
            f"more than max_ppl_increase {100 * max_increase:g}%; no output was written",
            "raise --bits or --budget, switch on --refine-steps / --norm-tweak-steps, or relax max_ppl_increase "
            "(finished blocks stay in the store, so a re-run only redoes what changed)",
        )


class InvalidPath(LayerquantError):
    """A path given on the command line cannot be used as asked (a file where a folder is
    needed, a folder under a regular file, ...)."""


class UnsafeOutput(LayerquantError):
    """Writing the output folder would delete something the run did not create."""


class Cancelled(LayerquantError):
    """The run was stopped by SIGINT / SIGTERM; finished work stays in the store."""

    def __init__(self, signum: int = 2):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__("interrupted: finished blocks are kept in the store", "re-run the same command to resume")
