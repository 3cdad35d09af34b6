"""A backend is a whole plug-in: one registration declares its methods, workers, Serve deployment, spec section
and rules, and nothing outside `spectune.backends` asks for a backend by name. A third backend registered here
(`toy`) is validated, started and served without a line of code that knows it."""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from spectune.backends import BACKENDS, Backend, Serving, resolve
from spectune.backends.vllm import VLLM_METHODS
from spectune.config import DecodeConfig
from spectune.methods import METHODS
from spectune.pair_ref import PairRef
from spectune.registry import Registry
from spectune.sweeps.spec import SpecError, parse_spec

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = {"spectune.workers": ROOT / "workers", "spectune.sweeps": ROOT / "sweeps",
            "spectune": ROOT / "platform" / "spectune"}


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (absolute names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def module_of(path: pathlib.Path) -> str:
    for package, folder in PACKAGES.items():
        if path.is_relative_to(folder):
            return ".".join([package, *path.relative_to(folder).with_suffix("").parts])
    raise AssertionError(path)


# --- the generic registry -------------------------------------------------------------------


@dataclass(frozen=True)
class Thing:
    name: str


def test_one_registry_wording_names_the_noun_the_name_and_every_known_one():
    things = Registry[Thing]("widget", [Thing("b"), Thing("a")])
    assert things.names() == ["a", "b"] and things.get("a") == Thing("a") and "b" in things
    with pytest.raises(ValueError, match=r"^unknown widget 'c'; known widgets: a, b$"):
        things.get("c")
    with pytest.raises(ValueError, match=r"^widget 'a' is registered twice$"):
        things.register(Thing("a"))


def register_method_again(name: str) -> None:
    method = METHODS.get(name)
    METHODS.register(name, method.knobs, needs_drafter=method.needs_drafter, summary="", paper="", cost="",
                     rule="")(method.build)


@pytest.mark.parametrize("registry, noun, register_again", [
    (METHODS, "method", register_method_again),
    (VLLM_METHODS, "vLLM speculative method", lambda name: VLLM_METHODS.register(VLLM_METHODS.get(name))),
    (BACKENDS, "backend", lambda name: BACKENDS.register(BACKENDS.get(name))),
])
def test_methods_vllm_methods_and_backends_share_the_registry_and_its_errors(registry, noun, register_again):
    with pytest.raises(ValueError, match=rf"^unknown {noun} 'nope'; known {noun}s: {', '.join(registry.names())}$"):
        registry.get("nope")
    first = registry.names()[0]
    with pytest.raises(ValueError, match=rf"^{noun} '{first}' is registered twice$"):
        register_again(first)


# --- what each backend declares ---------------------------------------------------------------


@pytest.mark.parametrize("name", BACKENDS.names())
def test_every_backend_declares_workers_and_a_completion_service_that_resolve(name):
    backend = BACKENDS.get(name)
    assert callable(resolve(backend.workers)) and callable(resolve(backend.serving.service))
    assert backend.serving.deployment_options()["max_constructor_retry_count"] >= 1


@pytest.mark.parametrize("backend, method, ongoing, retries", [("spectune", "sps", 32, 3), ("vllm", "ngram", 64, 2)])
def test_one_deployment_serves_every_backend_with_its_own_options(backend, method, ongoing, retries):
    from spectune.workers.serve.app import bind
    from spectune.workers.serve.served_config import Limits, ServedConfig, ServedSource

    served = ServedConfig(pair=PairRef(target="/m/target", drafter="/m/drafter"), method=method, model_id="m",
                          backend=backend, source=ServedSource(kind="config_file"))
    deployment = bind(served, Limits(), None, replicas=2)._bound_deployment
    assert (deployment.name, deployment.num_replicas) == ("SpectuneCompletions", 2)
    assert (deployment.max_ongoing_requests, deployment._deployment_config.max_constructor_retry_count) == (ongoing,
                                                                                                          retries)


def test_a_plug_in_path_that_is_not_module_colon_attr_is_refused():
    with pytest.raises(ValueError, match="no plug-in path: write it as package.module:attr"):
        resolve("spectune.workers.vllm.worker.start_vllm_pool")


def test_the_backend_core_imports_no_worker_module():
    for path in (ROOT / "platform" / "spectune" / "backends").glob("*.py"):
        upward = [m for m in imported_modules(path) if m.startswith(("spectune.workers", "spectune.sweeps"))]
        assert not upward, f"backends/{path.name} imports {upward}: name worker parts by path instead"


def test_the_serve_modules_import_no_backends_service_and_not_each_other():
    serve = ROOT / "workers" / "serve"
    imports = {module_of(p): imported_modules(p) for p in serve.glob("*.py")}
    services = {"spectune.workers.serve.completion", "spectune.workers.serve.vllm_completion"}
    assert not imports["spectune.workers.serve.app"] & services  # the deployment reaches them by the backend's path
    for service in services:
        assert "spectune.workers.serve.app" not in imports[service]
    for module, imported in imports.items():  # no cycle between any two of them
        for other in imported & set(imports):
            assert module not in imports[other], f"{module} and {other} import each other"


def test_no_module_outside_the_backends_compares_a_backend_name():
    """`backend == "vllm"` and the like: a backend's behaviour comes from its declaration, not its name."""
    named = {f'"{name}"' for name in BACKENDS.names()} | {"DEFAULT_BACKEND"}
    owned = [ROOT / "sweeps" / "launcher.py", ROOT / "sweeps" / "spec.py", *(ROOT / "workers" / "serve").glob("*.py"),
             *(ROOT / "workers" / "vllm").glob("*.py")]
    for path in owned:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                text = ast.unparse(node)
                assert not any(n in text for n in named) or "backend" not in text, f"{path.name}: {text}"


def test_a_dtype_axis_is_refused_by_a_backend_that_declares_none():
    base = {"name": "v", "pair": {"dir": "~/pairs/micro"}, "backend": "vllm", "space": {"ar": {}},
            "dtypes": ["float32", "bfloat16"]}
    with pytest.raises(SpecError, match=r"dtypes: backend vllm takes pair.dtype only; a dtype axis needs backend: spectune"):
        parse_spec(base)
    assert parse_spec({**base, "backend": "spectune", "space": {"sps": {}}}).dtypes == ["float32", "bfloat16"]


# --- a third backend ----------------------------------------------------------------------------


class ToyKnobs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = 1


@dataclass(frozen=True)
class ToyMethod:
    name: str
    knobs: type[BaseModel] = ToyKnobs
    needs_drafter: bool = False


TOY_METHODS = Registry[ToyMethod]("toy method", [ToyMethod("echo")])
STARTED: list[tuple[Any, ...]] = []


def start_toy_pool(pair: PairRef, size: int, cpus: float, gpus: float) -> str:
    STARTED.append((pair.target, size, cpus, gpus))
    return "toy pool"


def _toy_config(method: str, knobs: Mapping[str, Any], temperature: float) -> DecodeConfig:
    TOY_METHODS.get(method).knobs.model_validate(dict(knobs))
    return DecodeConfig(method, dict(knobs), temperature)


TOY = Backend(name="toy", summary="a third engine, for this test", methods=lambda: TOY_METHODS,
              make_config=_toy_config, workers=f"{__name__}:start_toy_pool",
              serving=Serving(f"{__name__}:start_toy_pool", max_ongoing_requests=7, max_constructor_retry_count=1),
              max_concurrency=None)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Backend:
    monkeypatch.setitem(BACKENDS._items, "toy", TOY)  # registered for this test only
    return TOY


def test_a_third_backend_is_validated_started_and_served_by_its_declaration_alone(toy):
    from spectune.sweeps.launcher import _start_workers
    from spectune.workers.serve.app import bind
    from spectune.workers.serve.served_config import Limits, ServedConfig, ServedSource

    spec = parse_spec({"name": "t", "pair": {"target": "/m/target"}, "backend": "toy",
                       "space": {"echo": {"width": [1, 2]}}, "load": {"concurrency": [1, 8]}})
    assert spec.trials == 4  # measured under load: its max_concurrency says so
    with pytest.raises(SpecError, match=r"space.echo.depth: unknown knob for echo; its knobs: width"):
        parse_spec({"name": "t", "pair": {"target": "/m/target"}, "backend": "toy", "space": {"echo": {"depth": [1]}}})
    assert _start_workers(spec, 2) == "toy pool" and STARTED[-1] == ("/m/target", 2, 1.0, 0.0)
    served = ServedConfig(pair=PairRef(target="/m/target"), method="echo", model_id="toy/echo", backend="toy",
                          source=ServedSource(kind="config_file"))
    deployment = bind(served, Limits(), None)._bound_deployment
    assert deployment.name == "SpectuneCompletions" and deployment.max_ongoing_requests == 7


def test_a_served_config_files_settings_section_is_its_backends_own(tmp_path):
    from spectune.workers.serve.served_config import ServeConfigError, from_config_file

    def served(**fields: Any) -> Any:
        path = tmp_path / "served.yaml"
        path.write_text(yaml.safe_dump({"pair": {"target": "/m/target"}, **fields}))
        return from_config_file(str(path))

    vllm = served(backend="vllm", method="ngram", vllm={"max_model_len": 512})
    assert (vllm.backend, vllm.server) == ("vllm", {"max_model_len": 512})
    assert served(method="ar").server == {}
    with pytest.raises(ServeConfigError, match=r"vllm: settings for backend vllm, but backend is spectune \(set backend: vllm\)"):
        served(method="ar", vllm={"max_model_len": 512})
    with pytest.raises(ServeConfigError, match=r"vllm.max_model_len: Input should be greater than or equal to 16"):
        served(backend="vllm", method="ngram", vllm={"max_model_len": 4})  # its settings model checks it up front
    with pytest.raises(ServeConfigError, match=r"colour: Extra inputs are not permitted"):
        served(method="ar", colour="red")


def test_both_services_admit_by_one_rule():
    from spectune.workers.serve.openai_schema import CompletionRequest
    from spectune.workers.serve.served_config import Limits, ServedConfig, ServedSource
    from spectune.workers.serve.service import RequestRejected, ServiceBase

    served = ServedConfig(pair=PairRef(target="/m/target"), method="ar", model_id="m",
                          source=ServedSource(kind="config_file"))
    admission = ServiceBase(served, Limits(max_tokens_limit=100))

    def reason(check: Any) -> tuple[str, str | None, int]:
        with pytest.raises(RequestRejected) as caught:
            check()
        return str(caught.value), caught.value.param, caught.value.status

    ask = CompletionRequest(prompt="hi", max_tokens=50)
    assert reason(lambda: admission.check_request(ask.model_copy(update={"model": "x"}), 64))[1:] == ("model", 404)
    assert "at most 100" in reason(lambda: admission.check_request(ask.model_copy(update={"max_tokens": 101}), 64))[0]
    assert "far longer" in reason(lambda: admission.check_request(ask.model_copy(update={"prompt": "x" * 4097}), 64))[0]
    admission.check_request(ask.model_copy(update={"compare_ar": True}), 64)  # spectune's engine compares
    admission.compare_ar_refused = "no AR here"
    assert reason(lambda: admission.check_request(ask.model_copy(update={"compare_ar": True}), 64))[:2] == (
        "no AR here", "compare_ar")
    admission.check_room(10, 50, 64)
    assert reason(lambda: admission.check_room(10, 60, 64)) == (
        "prompt (10 tokens) + max_tokens (60) exceeds the model's context of 64 tokens; max_tokens can be at most "
        "54 for this prompt", "max_tokens", 400)
    assert reason(lambda: admission.check_room(10, 50, 64, tree_nodes=8)) == (
        "prompt (10 tokens) + max_tokens (50) + draft tree (8 nodes) exceeds the model's context of 64 tokens; "
        "max_tokens can be at most 46 for this prompt", "max_tokens", 400)
    assert reason(lambda: admission.check_room(60, 1, 64, tree_nodes=8))[0] == (
        "the prompt is 60 tokens, longer than the model's context of 64 tokens allows (the draft tree needs 8 more)")
    assert reason(lambda: admission.check_room(0, 1, 64))[1] == "prompt"
