"""FineQuant-style adaptive granularity: data-free group sizes that follow the weights."""
from __future__ import annotations

import pytest
import torch

from layerquant.config import RunConfig
from layerquant.flows.quantize import quantize_flow
from layerquant.infra.checkpoint import CheckpointReader
from layerquant.solvers.granularity import (
    auto_group_sizes,
    choose_group_size,
    granularity_filter,
    granularity_scores,
    rtn_relative_error,
)
from layerquant.specs import QuantSpec


def gaussian(rows=256, cols=1024, seed=0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_smooth_weights_keep_coarse_groups_and_outlier_columns_get_fine_ones():
    smooth = gaussian()
    assert choose_group_size(smooth, 3) == 128
    outliers = smooth.clone()
    outliers[:, ::97] *= 12  # a few hot input channels, as LLM activation outliers leave them
    assert choose_group_size(outliers, 3) == 32
    # the choice is the one that wins at equal size: finer groups really do cut the error there
    fine = rtn_relative_error(outliers, QuantSpec(bits=3, group_size=32, method="rtn"))
    coarse = rtn_relative_error(outliers, QuantSpec(bits=3, group_size=128, method="rtn"))
    assert fine < 0.7 * coarse
    assert set(granularity_scores(outliers, 3)) == {0, 128, 64, 32}


def test_groups_wider_than_the_row_are_per_channel():
    narrow = gaussian(64, 64)
    assert set(granularity_scores(narrow, 4)) == {0, 32}
    assert choose_group_size(narrow, 4, group_sizes=(128,)) == 0


def test_filter_keeps_one_group_size_per_grid():
    outliers = gaussian()
    outliers[:, ::97] *= 12
    candidates = [QuantSpec(bits=b, group_size=g) for b in (2, 3, 4) for g in (32, 64, 128)]
    kept = [candidates[i] for i in granularity_filter(outliers, candidates)]
    assert sorted(spec.bits for spec in kept) == [2, 3, 4]  # one group size per bit-width
    assert {spec.group_size for spec in kept if spec.bits >= 3} == {32}


@pytest.mark.slow  # a whole stories260K run: about a minute
@pytest.mark.usefixtures("prefect_server")
def test_auto_granularity_end_to_end_on_stories(tmp_path, stories_model):
    report = quantize_flow(RunConfig(store=str(tmp_path), bits=4, granularity="auto", nsamples=32, eval_windows=20).model_dump())
    reader = CheckpointReader(stories_model)
    for index in range(reader.n_blocks):
        weights = reader.block_weights(index)
        prefix = reader.block_prefix(index)
        expected = auto_group_sizes(weights, {n: QuantSpec(bits=4) for n in reader.arch.linear_names})
        for layer in (l for l in report["layers"] if l["name"].startswith(prefix)):
            assert layer["group_size"] == expected[layer["name"][len(prefix):]].group_size
    assert report["ppl_quant"] < report["ppl_fp"] * 1.1


def test_budget_candidates_are_filtered_per_layer_and_fused_layers_agree(stories_model):
    from layerquant.tasks.planning import fused_groups, granularity_restrict

    reader = CheckpointReader(stories_model)
    candidates = RunConfig(budget=3.0, granularity="auto").candidate_specs()
    restrict = granularity_restrict(reader, candidates, fused_groups(reader))
    assert len(restrict) == 5 * 7
    for name, allowed in restrict.items():
        assert sorted(candidates[i].bits for i in allowed) == [2, 3, 4, 8], name  # one group size per bit-width
    for group in fused_groups(reader):
        assert len({tuple(restrict[name]) for name in group}) == 1
