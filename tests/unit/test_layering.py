"""Every import runs down the layers (or stays within one): read with `ast`, nothing is imported.

The layers, lowest first, follow DESIGN.md and the style guide: torch-free values every layer
passes; trees as plain data; the engine, which imports nothing above it; profilers that hook in
from outside; then what methods draft with (models, heads), the methods, the core that loads
pairs, benches and stores; backends, the Ray workers, the sweeps, the CLI, and the dashboard,
which only reads. A module may import its own layer and any layer below; an import of a higher
layer is an error unless `ALLOWED` lists it with the reason it remains and who removes it.

Every import counts, wherever it is written: a lazy import inside a function is still a
dependency (it only moves the cost), and a `TYPE_CHECKING` import still makes the lower module
name a higher layer's type (config.py's type-only import of the engine's `Sampling` is one of
the defects issue 18 lists). The failure message says which kind each offending import is.
"""

from __future__ import annotations

import ast
import pathlib
import tomllib
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[2]

# (layer, module prefixes), lowest first; a module belongs to the layer of its longest matching prefix.
# A new module must be placed here (test_every_module_has_a_layer), which is when its layer gets decided.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # torch-free values every layer passes (a Tune trial process, the store and the dashboard use them without torch)
    ("values", ("spectune.paths", "spectune.intervals", "spectune.config", "spectune.results", "spectune.prompts",
                "spectune.validation", "spectune.registry", "spectune.lossless")),
    ("trees", ("spectune.trees",)),  # plain data and pure functions: the engine builds its verify inputs with them
    ("engine", ("spectune.engine",)),  # the five-phase decode step: imports nothing above it
    ("profiling", ("spectune.profiling",)),  # timers that hook into the engine from outside
    ("models", ("spectune.models",)),  # building, training, importing pairs (distillation times forwards)
    ("heads", ("spectune.heads",)),  # trained Medusa/EAGLE heads (they train on the models' features)
    ("methods", ("spectune.methods",)),  # drafters and the method registry
    # loading pairs, benching, certifying, storing, reading results ("spectune" is the root package alone)
    ("core", ("spectune", "spectune.data", "spectune.pair_ref", "spectune.pair", "spectune.certificate",
              "spectune.metrics", "spectune.bench", "spectune.peer_hf", "spectune.pareto", "spectune.store",
              "spectune.sequoia_inputs", "spectune.cluster", "spectune.step_profile")),
    ("backends", ("spectune.backends",)),
    ("workers", ("spectune.workers",)),
    ("sweeps", ("spectune.sweeps",)),
    ("cli", ("spectune.cli",)),
    ("dashboard", ("spectune.dashboard",)),
)

# (importing module, imported module) -> why the upward import remains and who removes it.
ALLOWED: dict[tuple[str, str], str] = {
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    path: str
    line: int
    kind: str  # "top-level", "lazy" (inside a function) or "type-only" (under `if TYPE_CHECKING:`)

    def __str__(self) -> str:
        return (f"{self.path}:{self.line} {self.importer} [{layer_name(self.importer)}] -> "
                f"{self.imported} [{layer_name(self.imported)}] ({self.kind})")


def source_roots() -> dict[str, pathlib.Path]:
    """Package name -> source folder, as pyproject.toml maps them (`platform/` is a source root, not a package)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {package: ROOT / folder for package, folder in setuptools["package-dir"].items()}


def module_files() -> dict[str, pathlib.Path]:
    """Every module of the distribution: dotted name -> file."""
    roots = source_roots()
    nested = list(roots.values())
    found = {}
    for package, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            if any(other != folder and other in path.parents for other in nested):
                continue  # a folder mapped to its own package name is walked under that name
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


MODULES = module_files()


def layer_index(module: str) -> int | None:
    """The index in LAYERS of the module's layer (its longest matching prefix); None if none holds it."""
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _under(module, prefix) and len(prefix) > best:
                best, index = len(prefix), i
    return index


def _under(module: str, prefix: str) -> bool:
    if prefix == "spectune":  # the root package alone: every other module is placed by name
        return module == prefix
    return module == prefix or module.startswith(prefix + ".")


def layer_name(module: str) -> str:
    index = layer_index(module)
    return "?" if index is None else LAYERS[index][0]


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(n.lineno for n in ast.walk(child) if hasattr(n, "lineno"))
    return lines


def _function_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines.update(n.lineno for n in ast.walk(node) if hasattr(n, "lineno") and n is not node)
    return lines


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The modules an ImportFrom reaches: `from pkg import sub` reaches pkg.sub when sub is a module."""
    if node.level:
        base = importer if is_package else importer.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            base = base.rsplit(".", 1)[0]
        module = f"{base}.{node.module}" if node.module else base
    else:
        module = node.module or ""
    submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in MODULES]
    return submodules + ([module] if len(submodules) < len(node.names) else [])


def imports_of(module: str, path: pathlib.Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    type_only, lazy = _type_checking_lines(tree), _function_lines(tree)
    relative = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = _resolve(module, path.name == "__init__.py", node)
        else:
            continue
        kind = "type-only" if node.lineno in type_only else "lazy" if node.lineno in lazy else "top-level"
        found += [Import(module, t, relative, node.lineno, kind) for t in targets if t.split(".")[0] == "spectune"]
    return found


def all_imports() -> list[Import]:
    found = [imp for module, path in MODULES.items() for imp in imports_of(module, path)]
    return sorted(found, key=lambda i: (i.path, i.line, i.imported))


def upward(imports: list[Import]) -> list[Import]:
    return [i for i in imports if layer_index(i.importer) < layer_index(i.imported)]


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if layer_index(m) is None)
    assert unplaced == [], f"add these modules to a layer in LAYERS: {unplaced}"


def test_every_imported_spectune_module_exists_and_has_a_layer():
    unknown = [str(i) for i in all_imports() if layer_index(i.imported) is None]
    assert unknown == [], "imports of modules no layer holds:\n  " + "\n  ".join(unknown)


def test_no_import_runs_up_a_layer():
    offending = [i for i in upward(all_imports()) if (i.importer, i.imported) not in ALLOWED]
    assert offending == [], (
        f"{len(offending)} import(s) run up a layer (layers, lowest first: {' < '.join(n for n, _ in LAYERS)}):\n  "
        + "\n  ".join(map(str, offending))
        + "\nmove the code to the right layer, or (for a reason) list the edge in ALLOWED with who removes it"
    )


def test_every_allowed_upward_import_still_exists():
    """The allow-list only shrinks: an entry whose import is gone must be deleted, so it cannot hide a new one."""
    edges = {(i.importer, i.imported) for i in upward(all_imports())}
    stale = sorted(set(ALLOWED) - edges)
    assert stale == [], f"these ALLOWED entries no longer run up a layer: delete them: {stale}"


CHECKER_SAMPLE = """
from typing import TYPE_CHECKING
import spectune.engine.loop
from spectune.store import connect
from . import budget
from ..methods import base
if TYPE_CHECKING:
    from spectune.bench import Settings

def run():
    from spectune.workers.trials.pair_worker import PairWorker
"""


def test_the_walk_resolves_and_labels_every_kind_of_import(tmp_path):
    """The checker itself, on a sample engine module: relative, from-package, lazy and type-only imports."""
    path = tmp_path / "sample.py"
    path.write_text(CHECKER_SAMPLE)
    found = {(i.imported, i.kind, i.line) for i in imports_of("spectune.engine.sample", path)}
    assert found == {
        ("spectune.engine.loop", "top-level", 3),
        ("spectune.store", "top-level", 4),
        ("spectune.engine.budget", "top-level", 5),
        ("spectune.methods.base", "top-level", 6),
        ("spectune.bench", "type-only", 8),
        ("spectune.workers.trials.pair_worker", "lazy", 11),
    }
    ups = {i.imported for i in upward(imports_of("spectune.engine.sample", path))}
    assert ups == {"spectune.store", "spectune.methods.base", "spectune.bench", "spectune.workers.trials.pair_worker"}


def test_the_layers_place_the_packages_as_designed():
    order = [name for name, _ in LAYERS]
    assert order.index("engine") < order.index("methods") < order.index("core") < order.index("workers")
    assert order.index("cli") < order.index("dashboard"), "the CLI must not need the dashboard (plotly, streamlit)"
    assert layer_name("spectune.config") == "values" and layer_name("spectune.configx") == "?"
    assert layer_name("spectune.trees.draft") == "trees" and layer_name("spectune.workers.serve.app") == "workers"
