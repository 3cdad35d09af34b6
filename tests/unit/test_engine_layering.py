"""The engine is self-contained: it imports nothing from the methods or anything else above it, the tree
package imports nothing of spectune outside it (but the torch-free error formatter), and every drafter is a
`Drafter` with its abilities declared. tests/unit/test_layering.py checks every other layer."""

import ast
import inspect
import pathlib
import sys

import pytest

import spectune.methods as methods_package
from spectune.engine.drafter import Drafter
from spectune.methods.builtin import Autoregressive
from spectune.sequoia_inputs import RankRecorder

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "platform" / "spectune"
ENGINE_THIRD_PARTY = {"torch", "transformers"}


def imported_modules(path: pathlib.Path) -> list[str]:
    """Every module a file imports (absolute names; relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module)
    return names


def files(subpackage: str) -> list[pathlib.Path]:
    found = sorted((PACKAGE / subpackage).glob("*.py"))
    assert found, subpackage
    return found


def is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("path", files("engine"), ids=lambda p: p.name)
def test_the_engine_imports_only_torch_transformers_trees_and_itself(path):
    for module in imported_modules(path):
        top = module.split(".")[0]
        if top == "spectune":
            allowed = is_under(module, "spectune.engine") or is_under(module, "spectune.trees")
            assert allowed, f"{path.name} imports {module}: the engine imports nothing above it"
        else:
            assert top in ENGINE_THIRD_PARTY or top in sys.stdlib_module_names or top == "__future__", (
                f"{path.name} imports {module}: the engine depends on torch and transformers only"
            )


@pytest.mark.parametrize("path", files("trees"), ids=lambda p: p.name)
def test_pure_tree_modules_import_no_spectune_module_outside_trees(path):
    for module in imported_modules(path):
        if module.split(".")[0] == "spectune":
            allowed = is_under(module, "spectune.trees") or module == "spectune.validation"  # pydantic's errors, no model
            assert allowed, f"trees/{path.name} imports {module}"


def drafter_classes() -> list[type]:
    """Every class in spectune.methods that drafts (has a `draft` method)."""
    found = {}
    for info in pathlib.Path(methods_package.__file__).parent.glob("*.py"):
        module = __import__(f"spectune.methods.{info.stem}", fromlist=["_"])
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and callable(getattr(cls, "draft", None)):
                found[cls.__qualname__] = cls
    return list(found.values())


def test_every_drafter_in_methods_is_a_drafter():
    classes = drafter_classes()
    assert len(classes) >= 10  # ar, sps, tree, pld, layerskip, del, dytree, specinfer, ngram, recycling, pearl, ...
    assert [c.__name__ for c in classes if not issubclass(c, Drafter)] == []


def test_the_base_declares_every_optional_ability_with_its_default():
    drafter = Autoregressive()
    assert drafter.hidden_layers() == () and drafter.draft_modules() == () and drafter.verify_extras(None) is None
    assert drafter.exit_layer_acceptance() == {} and drafter.exit_choices() == {}
    with drafter.verifying(None):
        pass
    drafter.reset(), drafter.commit([1]), drafter.observe(None)  # no-ops
    with pytest.raises(TypeError):
        Drafter()  # draft is abstract


def test_the_rank_recorder_forwards_every_ability():
    abilities = [name for name, _ in inspect.getmembers(Drafter, inspect.isfunction) if not name.startswith("_")]
    missing = [name for name in abilities if getattr(RankRecorder, name) is getattr(Drafter, name)]
    assert missing == [], f"RankRecorder inherits instead of forwarding: {missing}"
