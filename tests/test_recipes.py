"""The recipes shipped in recipes/ are valid run settings (they are documented in the README and
used by the benchmarks; a renamed option or a refused combination must fail here, not in a
user's hour-long run)."""
from __future__ import annotations

from pathlib import Path

import pytest

from layerquant.config import RunConfig

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    assert {path.name for path in RECIPES} >= {"stories-w3g32.yaml", "gemma-budget.yaml", "gemma-3-w4a4kv4.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_is_a_valid_run_config(recipe):
    config = RunConfig.from_sources(recipe=str(recipe))
    assert config.run_id()
