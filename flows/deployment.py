"""The flow that scheduled deployments run: a recipe file plus where to put things."""
from __future__ import annotations

from typing import Any

from prefect import flow

from layerquant.config import RunConfig
from layerquant.flows.quantize import quantize_flow
from layerquant.infra.hub import resolve_model


@flow(name="layerquant-recipe", flow_run_name="recipe {recipe}", persist_result=False)
def quantize_recipe_flow(recipe: str, out: str, store: str = RunConfig.model_fields["store"].default, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantize with the settings of a YAML recipe (paths relative to the working directory)."""
    config = RunConfig.from_sources(recipe, out=out, store=store, **(overrides or {}))
    config = config.model_copy(update={"model": resolve_model(config.model)})  # a hub id: its cached snapshot
    return quantize_flow(config.model_dump())
