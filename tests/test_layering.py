"""Dependencies point one way (layerquant/layering.py): the real tree keeps the rule, the checker
catches each kind of break, and the README's diagram is the table's own rendering."""
from __future__ import annotations

import textwrap
from pathlib import Path

from layerquant.layering import check_layering, render_layer_diagram

ROOT = Path(__file__).resolve().parents[1]


def test_the_source_tree_keeps_the_layering():
    violations = check_layering(ROOT)
    assert not violations, "\n".join(map(str, violations))


def _write(root: Path, relative: str, source: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))


def test_each_kind_of_break_is_reported(tmp_path):
    _write(tmp_path, "solvers/__init__.py", "")
    _write(tmp_path, "solvers/upward.py", """
        def later():
            from layerquant.tasks.blocks import quantize_block  # inside a function still counts
            return quantize_block
    """)
    _write(tmp_path, "solvers/relative.py", "from ..kernels import packing\n")
    _write(tmp_path, "infra/uses_prefect.py", "import prefect.artifacts\n")
    _write(tmp_path, "kernels/sibling.py", "from layerquant.solvers.grid import fit_grid\n")
    _write(tmp_path, "layerquant/core_reaches_up.py", "from layerquant import tasks\n")
    _write(tmp_path, "solvers/uses_boto.py", "import boto3\n")
    # allowed: what each layer may import
    _write(tmp_path, "tasks/fine.py", "from prefect import task\nfrom layerquant.solvers import grid\nfrom . import context\n")
    _write(tmp_path, "infra/fine.py", "import boto3\nfrom layerquant.specs import QuantSpec\nfrom .store import open_store\n")
    _write(tmp_path, "layerquant/cli.py", "from layerquant.flows.quantize import quantize_flow\nimport prefect\n")
    _write(tmp_path, "bench/anything.py", "from layerquant.tasks import blocks\n")  # outside every layer

    found = {(v.path, v.line, v.layer, v.imported) for v in check_layering(tmp_path)}

    assert found == {
        ("solvers/upward.py", 3, "solvers", "layerquant.tasks.blocks.quantize_block"),
        ("solvers/relative.py", 1, "solvers", "layerquant.kernels.packing"),
        ("infra/uses_prefect.py", 1, "infra", "prefect.artifacts"),
        ("kernels/sibling.py", 1, "kernels", "layerquant.solvers.grid.fit_grid"),
        ("layerquant/core_reaches_up.py", 1, "core", "layerquant.tasks"),
        ("solvers/uses_boto.py", 1, "solvers", "boto3"),
    }


def test_readme_diagram_is_rendered_from_the_table():
    readme = (ROOT / "README.md").read_text()
    block = f"<!-- layering diagram -->\n{render_layer_diagram()}\n<!-- /layering diagram -->"
    assert block in readme, "README.md's layering diagram is stale: paste render_layer_diagram()'s output between its markers"
