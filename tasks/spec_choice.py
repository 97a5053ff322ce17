"""The two spec decisions the quantize flow makes itself, between tasks: each matrix's group
size under granularity "auto", and the finer specs a quality gate may move a layer to.

Both are cheap, plain function calls (no artifacts, no Prefect task), but flows reach the
solvers only through tasks (see layerquant/layering.py), so this is where they are offered.
"""
from __future__ import annotations

from layerquant.solvers.allocation import more_generous
from layerquant.solvers.granularity import auto_group_sizes

__all__ = ["auto_group_sizes", "more_generous"]
