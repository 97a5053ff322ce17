"""The HIGGS coefficient is fitted on the store's finished budget runs of the same setting:
runs written before a setting existed still count, other settings and other versions do not."""
from __future__ import annotations

import math

import pytest

from layerquant.config import RunConfig
from layerquant.infra.store import LocalStore
from layerquant.tasks.planning import higgs_coefficient


def finished_budget_run(store: LocalStore, name: str, config: dict, predicted_loss: float, ppl_ratio: float) -> None:
    report = {"ppl_fp": 10.0, "ppl_quant": 10.0 * ppl_ratio, "plan": {"predicted_loss": predicted_loss}}
    store.write_manifest(name, {"run_id": name, "status": "completed", "config": config, "report": report})


def test_fit_matches_runs_by_identity(tmp_path):
    store = LocalStore(tmp_path)
    config = RunConfig(budget=3.25, store=str(tmp_path))
    older = config.model_dump()
    del older["tuning_space"]  # stored before the field existed: untuned, so the same setting
    finished_budget_run(store, "older", older, predicted_loss=0.5, ppl_ratio=math.exp(0.2))
    finished_budget_run(store, "same", config.model_dump() | {"budget": 2.5}, predicted_loss=1.0, ppl_ratio=math.exp(0.4))
    finished_budget_run(store, "other-bits", config.model_dump() | {"bits": 3}, predicted_loss=1.0, ppl_ratio=math.exp(5.0))
    finished_budget_run(store, "other-version", config.model_dump() | {"unknown_setting": 1}, predicted_loss=1.0, ppl_ratio=math.exp(5.0))
    fit = higgs_coefficient(store, config)
    assert fit["runs"] == 2 and fit["coefficient"] == pytest.approx(0.4)
