"""Which layer of layerquant may import which: the one table, and a checker that reads the source.

Dependencies point one way, from orchestration down to pure data:

    cli -> flows -> tasks -> infra, solvers, kernels -> core

solvers (the math) and kernels (packing, Triton) are siblings that never import each other;
infra (I/O) knows no math; flows wire tasks together and reach the math only through them.
Prefect belongs to the orchestration layers and boto3 to the S3 store, so the pure layers stay
importable, and testable, without either.

`check_layering` parses every .py file with `ast` (imports inside functions included, relative
imports resolved) and never imports the code it checks. `render_layer_diagram` draws the same
table for the README, so the picture cannot drift from the rule.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layer:
    name: str
    source: str  # folder (or single file) of the layer, relative to the repository root
    module: str  # the import name that source installs as
    role: str  # one line for the diagram
    may_import: tuple[str, ...]  # other layers this one may import (itself always)
    third_party: tuple[str, ...] = ()  # packages of RESERVED_PACKAGES this layer may import


# third-party packages reserved to some layers: orchestration and cloud I/O stay out of the math
RESERVED_PACKAGES = ("prefect", "boto3", "botocore")

LAYERS: tuple[Layer, ...] = (
    Layer("cli", "layerquant/cli.py", "layerquant.cli", "the command line",
          ("flows", "tasks", "infra", "solvers", "kernels", "core"), RESERVED_PACKAGES),
    Layer("flows", "flows", "layerquant.flows", "Prefect flows: wiring only",
          ("tasks", "infra", "core"), RESERVED_PACKAGES),
    Layer("tasks", "tasks", "layerquant.tasks", "Prefect tasks: refs in -> one pure call -> refs out",
          ("solvers", "kernels", "infra", "core"), RESERVED_PACKAGES),
    Layer("infra", "infra", "layerquant.infra", "I/O: artifact store, S3, checkpoints, texts",
          ("core",), ("boto3", "botocore")),
    Layer("solvers", "solvers", "layerquant.solvers", "pure math: GPTQ, RTN, PB-LLM, allocation",
          ("core",)),
    Layer("kernels", "kernels", "layerquant.kernels", "packing formats, Triton kernels",
          ("core",)),
    Layer("core", "layerquant", "layerquant", "specs, errors, config, families, defaults, report",
          ()),
)


@dataclass(frozen=True)
class Violation:
    path: str  # relative to the checked root
    line: int
    layer: str  # the importing module's layer
    imported: str  # the module name as imported (resolved when relative)
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.layer} imports {self.imported}: {self.reason}"


def layer_of_module(module: str, layers: tuple[Layer, ...] = LAYERS) -> Layer | None:
    """The layer a dotted module name belongs to (the most specific match), None outside layerquant."""
    matches = [layer for layer in layers if module == layer.module or module.startswith(layer.module + ".")]
    return max(matches, key=lambda layer: len(layer.module), default=None)


def layer_of_path(relative: Path, layers: tuple[Layer, ...] = LAYERS) -> Layer | None:
    """The layer a source file belongs to (the most specific source), None outside every layer."""
    matches = [layer for layer in layers if relative == Path(layer.source) or Path(layer.source) in relative.parents]
    return max(matches, key=lambda layer: len(Path(layer.source).parts), default=None)


def module_name(relative: Path, layer: Layer) -> str:
    """Dotted name a file installs as: solvers/grid.py -> layerquant.solvers.grid."""
    if relative == Path(layer.source):  # a single-file layer: layerquant/cli.py
        return layer.module
    parts = [*layer.module.split("."), *relative.relative_to(layer.source).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import anywhere in `tree`, functions included.

    `from package import name` yields "package.name": name may be a submodule
    (`from layerquant import solvers`), and for a plain attribute the longer name still lies in
    the same layer as the package."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.extend((node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names)
    return sorted(found)


def check_layering(root: str | Path, layers: tuple[Layer, ...] = LAYERS) -> list[Violation]:
    """Every import under `root` that breaks the table: a layer importing one it may not, or a
    reserved third-party package outside the layers allowed it."""
    root = Path(root)
    by_name = {layer.name: layer for layer in layers}
    violations: list[Violation] = []
    files = sorted({path for layer in layers for path in _sources(root / layer.source)})
    for path in files:
        relative = path.relative_to(root)
        layer = layer_of_path(relative, layers)
        if layer is None:
            continue
        module = module_name(relative, layer)
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, imported in imported_modules(tree, module, path.name == "__init__.py"):
            target = layer_of_module(imported, layers)
            if target is not None:
                if target.name != layer.name and target.name not in layer.may_import:
                    allowed = "".join(f", {name}" for name in layer.may_import)
                    violations.append(Violation(str(relative), line, layer.name, imported,
                                                f"{layer.name} may import only itself{allowed}, not {target.name}"))
                continue
            top = imported.split(".")[0]
            if top in RESERVED_PACKAGES and top not in layer.third_party:
                holders = ", ".join(name for name, other in by_name.items() if top in other.third_party)
                violations.append(Violation(str(relative), line, layer.name, imported,
                                            f"{top} belongs to {holders} only"))
    return violations


def _sources(source: Path) -> list[Path]:
    if source.is_file():
        return [source] if source.suffix == ".py" else []
    return sorted(source.rglob("*.py")) if source.is_dir() else []


def render_layer_diagram(layers: tuple[Layer, ...] = LAYERS) -> str:
    """The table as the README shows it: a fenced block, top layer first, one row per layer."""
    rows = []
    for layer in layers:
        others = {other.name for other in layers} - {layer.name}
        if set(layer.may_import) == others and set(layer.third_party) == set(RESERVED_PACKAGES):
            imports = "anything"
        else:
            imports = ", ".join(layer.may_import) or "-"
            imports += f" + {', '.join(layer.third_party)}" if layer.third_party else ""
        rows.append((layer.name, _shown_source(layer), layer.role, imports))
    header = ("layer", "source", "what it holds", "may import")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]

    def line(row: tuple[str, str, str, str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]

    body = [line(header), *(line(row) for row in rows)]
    note = ["Nothing imports a layer above it; solvers and kernels never import each other;",
            f"{', '.join(RESERVED_PACKAGES)} only where listed. Checked by tests/test_layering.py."]
    return "\n".join(["```", *body, "```", "", *note])


def _shown_source(layer: Layer) -> str:
    return layer.source if layer.source.endswith(".py") else layer.source + "/"
