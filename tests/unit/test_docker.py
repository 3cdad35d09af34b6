"""docker/ agrees with the project and with itself: images, compose stack, KubeRay, docs.

No Docker engine or Kubernetes runs here, so this checks what can be checked without one:
every Dockerfile and YAML parses; every command a container, a manifest or docs/cluster.md
runs is parsed by the real CLI it names (spectune's typer app, Ray's click CLI), so an
unknown subcommand or option or a bad value fails here; import paths import, sweep specs
load with the spec validator and the Serve config validates with Ray Serve's own schema;
image tags, service names, secrets and environment variables agree across files; and
`docker compose config` accepts the stack where the compose plugin is installed.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from deploy_files import (
    Parsed,
    Stage,
    arg_defaults,
    checked_program,
    container_commands,
    dockerignore_patterns,
    dockerignored,
    flatten,
    interpolate,
    interpolate_tree,
    parse_command,
    parse_dockerfile,
    quantity,
    simple_commands,
    stages,
    variables,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
KUBERAY = DOCKER / "kuberay"
DOCS = ROOT / "docs" / "cluster.md"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.cuda"}
IMAGE_SUFFIX = {"cpu": "cpu", "gpu": "cuda"}  # spectune:VERSION-cpu / -cuda
DOT_ENV = {"POSTGRES_PASSWORD": "pw0123", "RAY_AUTH_TOKEN": "token0123"}  # what a user's docker/.env holds
CONTAINER_HOME = PurePosixPath("/home/ray")  # the rayproject/ray images' user
SERVICES = {"postgres", "ray-head", "ray-worker", "dashboard", "endpoint"}
SPECTUNE_SERVICES = ("ray-head", "ray-worker", "dashboard", "endpoint")
RAY_SERVICES = ("ray-head", "ray-worker")
BASE_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py311-(?P<variant>cpu|gpu)$")


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> dict[str, list[Stage]]:
    return {variant: stages(parse_dockerfile(path.read_text())) for variant, path in DOCKERFILES.items()}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker/compose.yaml as compose sees it with docker/.env filled in."""
    return interpolate_tree(read_yaml(DOCKER / "compose.yaml"), DOT_ENV)


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """KubeRay manifests and secrets by kind (one object of each kind except Secret)."""
    found: dict[str, Any] = {"Secret": {}}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: a document without apiVersion/kind/metadata"
            if doc["kind"] == "Secret":
                found["Secret"][doc["metadata"]["name"]] = doc
            else:
                assert doc["kind"] not in found, f"two {doc['kind']} objects"
                found[doc["kind"]] = doc
    assert {"RayJob", "RayService"} <= set(found)
    return found


@pytest.fixture(scope="module")
def doc_commands() -> list[list[str]]:
    """Every simple command in docs/cluster.md's bash blocks (heredoc bodies skipped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S):
        for line in _shell_lines(block):
            commands.extend(simple_commands(line))
    assert commands, "docs/cluster.md has no ```bash blocks"
    return commands


def _shell_lines(block: str) -> list[str]:
    lines, pending, heredoc_end = [], "", None
    for raw in block.splitlines():
        if heredoc_end is not None:
            heredoc_end = None if raw.strip() == heredoc_end else heredoc_end
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line, pending = pending + raw, ""
        if (marker := re.search(r"<<-?\s*'?(\w+)'?", line)) is not None:
            heredoc_end, line = marker.group(1), line[: marker.start()]
        lines.append(line)
    return lines


def final(stages_: list[Stage]) -> Stage:
    return stages_[-1]


def image_path_in_repo(stage: Stage, image_path: PurePosixPath) -> Path | None:
    """The repository file or folder that a COPY put at `image_path` in the image."""
    workdir = PurePosixPath("/")
    for instruction in stage.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = workdir / instruction.args
        if instruction.keyword != "COPY" or "from" in instruction.flags:
            continue
        *sources, dest = instruction.operands
        for source in sources:
            target = workdir / dest / Path(source).name if dest.endswith("/") else workdir / dest
            if image_path == target or target in image_path.parents:
                return ROOT / source / image_path.relative_to(target)
    return None


def image_workdir(stage: Stage) -> PurePosixPath:
    workdir = PurePosixPath("/")
    for instruction in stage.all("WORKDIR"):
        workdir = workdir / instruction.args
    return workdir


def run_commands(stage: Stage) -> list[list[str]]:
    return [words for run in stage.all("RUN") for words in simple_commands(run.args)]


# --- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_images_build_on_the_official_ray_image_of_the_projects_ray(images, variant):
    import ray

    stages_ = images[variant]
    assert [s.name for s in stages_] == ["wheel", None], "a wheel stage, then the image"
    for stage in stages_:
        base = BASE_IMAGE.match(stage.base)
        assert base, f"{DOCKERFILES[variant].name}: FROM {stage.base} is not rayproject/ray:X.Y.Z-py311-cpu|gpu"
        assert base["variant"] == variant
        # `ray job submit` from the project's virtualenv talks to these nodes: same Ray.
        assert base["ray"].split(".")[:2] == ray.__version__.split(".")[:2], (
            f"image Ray {base['ray']} but the project runs Ray {ray.__version__}")


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_project_is_installed_from_its_wheel_and_no_source_reaches_the_image(images, variant):
    wheel, image = images[variant]
    assert ["pip", "wheel"] == run_commands(wheel)[-1][:2] and run_commands(wheel)[-1][-1] == "."
    assert any(c.flags.get("from") == "wheel" for c in image.all("COPY"))
    installs = [words for words in run_commands(image) if words[:2] == ["pip", "install"]]
    assert any(any(re.fullmatch(r"/tmp/wheels/spectune-\*\.whl", w) for w in words) for words in installs)
    assert ["rm", "-rf", "/tmp/wheels", "/tmp/ray-pin.txt"] in run_commands(image)
    for words in installs + run_commands(wheel):
        assert not {"-e", "--editable"} & set(words), f"an editable install: {shlex.join(words)}"
    for copy in image.all("COPY"):
        if "from" not in copy.flags:  # only data: the sweep specs and Serve configs users start from
            for source in copy.operands[:-1]:
                assert source == "sweeps/specs" or source.endswith(".yaml"), f"source copied into the image: {source}"


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_torch_is_the_makefiles_pin_from_pytorchs_index_for_the_variant(images, variant):
    image = final(images[variant])
    args = arg_defaults(image)
    torch_install = next(w for w in run_commands(image) if w[:2] == ["pip", "install"] and any("torch==" in x for x in w))
    index = interpolate(torch_install[torch_install.index("--index-url") + 1], args)
    expected_index = r"https://download\.pytorch\.org/whl/cpu" if variant == "cpu" else r"https://download\.pytorch\.org/whl/cu\d{3}"
    assert re.fullmatch(expected_index, index), index
    pinned = interpolate(next(x for x in torch_install if "torch==" in x), args)
    makefile_pin = re.search(r"^TORCH\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert pinned == makefile_pin


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_copied_paths_exist_and_are_in_the_build_context(images, variant):
    patterns = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    for stage in images[variant]:
        for copy in stage.all("COPY"):
            if "from" in copy.flags:
                continue
            for source in copy.operands[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
                assert not dockerignored(source, patterns), f"COPY {source}: .dockerignore leaves it out"


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context():
    patterns = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    for path in (".venv/bin/python", ".git/config", "docker/.env", "docker/secrets/ray_auth_token", "spectune.db",
                 "tests/unit/test_docker.py", "platform/spectune/__pycache__/db.cpython-311.pyc"):
        assert dockerignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "README.md", "platform/spectune/cli/__init__.py", "sweeps/specs/quick.yaml"):
        assert not dockerignored(path, patterns), f"{path} is needed by the build but ignored"


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_image_commands_are_registered_commands(images, variant):
    image = final(images[variant])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (cmd,) = image.all("CMD")
    assert cmd.args.startswith("["), "CMD in exec form (signals reach the process)"
    assert cmd.words[0] in scripts
    for words in [cmd.words, *run_commands(image)]:
        if checked_program(words):
            parse_command(words)


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_the_images_working_directory_holds_the_sweep_specs(images, variant):
    image = final(images[variant])
    specs = image_path_in_repo(image, image_workdir(image) / "sweeps/specs/quick.yaml")
    assert specs == ROOT / "sweeps/specs/quick.yaml" and specs.is_file()


# --- compose --------------------------------------------------------------------------------


def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def service_commands(service: dict[str, Any]) -> list[Parsed]:
    """What a service runs (bash -c opened up; the container's environment expanded), parsed."""
    env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
    command = service["command"]
    expanded = interpolate(command, env) if isinstance(command, str) else [interpolate(w, env) for w in command]
    return [parse_command(words) for words in container_commands(expanded) if checked_program(words)]


def listening_ports(parsed: list[Parsed]) -> set[int]:
    ports = set()
    for item in parsed:
        if item.command == "ray start":
            ports |= {item.params["port"]} if item.params["head"] else set()
            ports |= {item.params["dashboard_port"]} if item.params["head"] else {item.params["dashboard_agent_listen_port"]}
        elif "port" in item.params and item.params["port"] is not None:
            ports.add(int(item.params["port"]))
    return ports


def test_compose_runs_head_two_workers_postgres_dashboard_and_endpoint(compose):
    assert set(services(compose)) == SERVICES
    assert services(compose)["ray-worker"]["deploy"]["replicas"] == 2
    assert services(compose)["endpoint"]["profiles"] == ["endpoint"]  # it serves a finished sweep


def test_every_service_has_a_health_check_and_waits_for_healthy_dependencies(compose):
    for name, service in services(compose).items():
        assert service.get("healthcheck", {}).get("test"), f"{name}: no health check"
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services(compose), f"{name} depends on unknown service {dependency}"
            assert rule == {"condition": "service_healthy"}, f"{name} -> {dependency}: {rule}"


def test_spectune_services_run_the_cpu_image_built_from_the_repository(compose):
    for name in SPECTUNE_SERVICES:
        service = services(compose)[name]
        assert service["image"] == f"spectune:{project_version()}-cpu"
        context = (DOCKER / service["build"]["context"]).resolve()
        assert context == ROOT and (context / service["build"]["dockerfile"]) == DOCKERFILES["cpu"]


def test_postgres_keeps_its_data_in_a_named_volume(compose):
    postgres = services(compose)["postgres"]
    volume, _, target = postgres["volumes"][0].partition(":")
    assert volume in compose["volumes"] and target == "/var/lib/postgresql/data"
    env = postgres["environment"]
    assert shlex.split(postgres["healthcheck"]["test"][1]) == ["pg_isready", "-U", env["POSTGRES_USER"], "-d", env["POSTGRES_DB"]]


def test_store_url_of_every_spectune_service_is_the_postgres_service(compose):
    import sqlalchemy as sa

    from spectune.store import resolve_url

    postgres = services(compose)["postgres"]["environment"]
    for name in SPECTUNE_SERVICES:
        url = sa.make_url(resolve_url(services(compose)[name]["environment"]["SPECTUNE_DB"]))
        assert url.drivername == "postgresql+psycopg", name
        assert (url.host, url.port) == ("postgres", 5432)
        assert (url.username, url.password, url.database) == (
            postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"])


def test_the_store_reads_the_url_from_SPECTUNE_DB(monkeypatch):
    from spectune.store import resolve_url

    monkeypatch.setenv("SPECTUNE_DB", "postgresql://u:p@postgres:5432/spectune")
    assert resolve_url(None) == "postgresql+psycopg://u:p@postgres:5432/spectune"


def test_ray_nodes_take_the_token_from_a_compose_secret(compose):
    for name in RAY_SERVICES:
        service = services(compose)[name]
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        secret = PurePosixPath(env["RAY_AUTH_TOKEN_PATH"])
        assert secret.parent == PurePosixPath("/run/secrets") and secret.name in service["secrets"]
        assert compose["secrets"][secret.name] == {"environment": "RAY_AUTH_TOKEN"}
        assert "RAY_AUTH_TOKEN" not in env, f"{name}: the token would show in `docker inspect`"


def test_ray_reads_its_token_from_RAY_AUTH_TOKEN_PATH(tmp_path):
    """The installed Ray takes the token from the file compose mounts (Ray's own loader, in
    a fresh process so that this one's Ray configuration stays as it was)."""
    token_file = tmp_path / "ray_auth_token"
    token_file.write_text("token-from-the-secret-file")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file), "HOME": str(tmp_path)}
    probe = "from ray._raylet import AuthenticationTokenLoader as L; print(L.instance().get_raw_token())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "token-from-the-secret-file"


def test_workers_join_the_head_at_RAY_ADDRESS(compose):
    (head,) = [p for p in service_commands(services(compose)["ray-head"]) if p.command == "ray start"]
    (worker,) = service_commands(services(compose)["ray-worker"])
    assert head.params["head"] and not worker.params["head"]
    assert services(compose)["ray-worker"]["environment"]["RAY_ADDRESS"] == f"ray-head:{head.params['port']}"
    assert worker.params["address"] == f"ray-head:{head.params['port']}"
    assert head.params["num_cpus"] == 0  # trials and pair workers run on the workers


@pytest.mark.parametrize("name", sorted(SERVICES - {"postgres"}))
def test_service_commands_parse_and_health_checks_probe_their_ports(compose, name):
    service = services(compose)[name]
    parsed = service_commands(service)
    assert parsed, f"{name}: runs no spectune or ray command"
    ports = listening_ports(parsed)
    probed = {int(port) for port in re.findall(r"http://127\.0\.0\.1:(\d+)/", " ".join(service["healthcheck"]["test"]))}
    assert probed and probed <= ports, f"{name}: health check {service['healthcheck']['test']} vs ports {ports}"
    for mapping in service.get("ports", []):
        assert int(mapping.rsplit(":", 1)[1]) in ports, f"{name}: publishes {mapping}, listens on {ports}"
        assert mapping.startswith("127.0.0.1:"), f"{name}: {mapping} is reachable beyond this machine"


def test_pair_and_tune_state_sit_on_one_volume_at_the_same_path_on_every_node(compose, monkeypatch):
    from spectune.models.presets import default_pair_dir
    from spectune.sweeps.spec import load_spec

    mounts = {name: dict(v.split(":", 1)[::-1] for v in services(compose)[name]["volumes"])
              for name in ("ray-head", "ray-worker", "endpoint")}
    cache_dir = str(CONTAINER_HOME / ".cache/spectune")
    assert {m[cache_dir] for m in mounts.values()} == {"spectune-cache"}
    (build,) = [p for p in service_commands(services(compose)["ray-head"]) if p.command == "spectune models build"]
    # In the containers HOME is /home/ray: the head builds the pair where quick.yaml loads it.
    monkeypatch.delenv("SPECTUNE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(CONTAINER_HOME))
    built = PurePosixPath(default_pair_dir(build.params["preset"], build.params["seed"]))
    quick = load_spec(ROOT / "sweeps/specs/quick.yaml")
    assert PurePosixPath(quick.pair.target).parent == built
    assert PurePosixPath(cache_dir) in built.parents


def test_endpoint_serves_the_sweep_the_docs_run(compose):
    from spectune.sweeps.spec import load_spec

    (serve,) = service_commands(services(compose)["endpoint"])
    assert serve.command == "spectune serve" and serve.params["host"] == "0.0.0.0"
    assert serve.params["sweep"] == load_spec(ROOT / "sweeps/specs/quick.yaml").name


def test_every_compose_variable_is_listed_in_env_example(compose):
    raw = (DOCKER / "compose.yaml").read_text()
    example = (DOCKER / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, flags=re.M))
    used = variables(read_yaml(DOCKER / "compose.yaml"))
    assert used <= listed, f"not in docker/.env.example: {used - listed}"
    # The secrets: required by compose (${VAR:?...}) or the source of a compose secret; the
    # example leaves them empty for the user to fill in.
    secrets = set(re.findall(r"\$\{([A-Z0-9_]+):\?", raw)) | {s["environment"] for s in compose["secrets"].values()}
    assert secrets == {"POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"}
    for name in secrets:
        assert re.search(rf"^{name}=$", example, flags=re.M), f"{name} should be an empty line in .env.example"


@pytest.fixture(scope="module")
def docker_compose() -> list[str]:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client here: `docker compose config` not run")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"the docker client has no compose plugin ({probe.stderr.strip() or probe.stdout.strip()})")
    return [docker, "compose", "-f", str(DOCKER / "compose.yaml")]


def test_docker_compose_config_accepts_the_stack(docker_compose, tmp_path):
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in DOT_ENV.items()))
    clean_env = {k: v for k, v in os.environ.items() if k not in DOT_ENV}
    ok = subprocess.run([*docker_compose, "--env-file", str(env_file), "--profile", "endpoint", "config", "--quiet"],
                        capture_output=True, text=True, env=clean_env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    env_file.write_text(f"RAY_AUTH_TOKEN={DOT_ENV['RAY_AUTH_TOKEN']}\n")
    missing = subprocess.run([*docker_compose, "--env-file", str(env_file), "config", "--quiet"],
                             capture_output=True, text=True, env=clean_env, timeout=120)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr


# --- KubeRay --------------------------------------------------------------------------------


def cluster_spec(manifests: dict[str, Any], kind: str) -> dict[str, Any]:
    spec = manifests[kind]["spec"]
    return spec["rayClusterSpec"] if kind == "RayJob" else spec["rayClusterConfig"]


def containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def gpu_spec():
    from spectune.sweeps.spec import load_spec

    return load_spec(ROOT / "sweeps/specs/gpu_cluster.yaml")


def test_rayjob_runs_the_gpu_sweep_spec_from_the_images_working_directory(manifests, images):
    job = manifests["RayJob"]["spec"]
    (sweep,) = [parse_command(w) for w in simple_commands(job["entrypoint"])]
    assert sweep.command == "spectune sweep"
    assert sweep.params["db"] is None, "the store URL comes from $SPECTUNE_DB, not the job's command line (logged)"
    working_dir = PurePosixPath(yaml.safe_load(job["runtimeEnvYAML"])["working_dir"])
    image = final(images["gpu"])
    assert working_dir == image_workdir(image)
    spec_file = image_path_in_repo(image, working_dir / sweep.params["spec"])
    assert spec_file == ROOT / "sweeps/specs/gpu_cluster.yaml" and spec_file.is_file()
    assert gpu_spec().pair.device.startswith("cuda")
    assert job["submissionMode"] == "K8sJobMode" and job["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_ray_clusters_run_the_cuda_image_and_its_ray(manifests, images, kind):
    cluster = cluster_spec(manifests, kind)
    ray_version = BASE_IMAGE.match(final(images["gpu"]).base)["ray"]
    assert cluster["rayVersion"] == ray_version
    for container in containers(cluster):
        assert re.fullmatch(rf"[\w.\-]+(:\d+)?/spectune:{re.escape(project_version())}-cuda", container["image"]), container["image"]
    assert len({c["image"] for c in containers(cluster)}) == 1


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_ray_start_params_are_ray_start_options(manifests, kind):
    cluster = cluster_spec(manifests, kind)
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    groups = [("--head", head_params)] + [("--address=ray-head:6379", g["rayStartParams"]) for g in cluster["workerGroupSpecs"]]
    for first, params in groups:
        assert all(isinstance(v, str) for v in params.values()), f"rayStartParams values must be strings: {params}"
        parse_command(["ray", "start", first, *(f"--{k}={v}" for k, v in params.items())])
    assert head_params["num-cpus"] == "0", "the head runs the driver only"


def gpus(container: dict[str, Any]) -> float:
    resources = container["resources"]
    assert resources["limits"].get("nvidia.com/gpu") == resources["requests"].get("nvidia.com/gpu")
    return quantity(resources["limits"].get("nvidia.com/gpu", 0))


def test_rayjob_workers_request_gpus_enough_for_the_sweeps_concurrency(manifests):
    spec = gpu_spec()
    slots = 0
    for group in cluster_spec(manifests, "RayJob")["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert gpus(container) > 0, f"worker group {group['groupName']} requests no GPU"
        per_pod = min(quantity(container["resources"]["limits"]["cpu"]) // spec.resources.cpus,
                      gpus(container) // spec.resources.gpus)
        slots += int(per_pod) * group["replicas"]
    assert slots >= spec.concurrency, f"the cluster holds {slots} trial slots, the spec runs {spec.concurrency}"


def test_secrets_are_referenced_by_name_and_key(manifests):
    secrets = manifests["Secret"]
    for kind in ("RayJob", "RayService"):
        cluster = cluster_spec(manifests, kind)
        auth = cluster["authOptions"]
        assert auth["mode"] == "token" and "auth_token" in secrets[auth["secretName"]]["stringData"]
        for container in containers(cluster):
            for env in container.get("env", []):
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["key"] in secrets[ref["name"]]["stringData"], f"{kind}: {env['name']} -> {ref}"


def test_secret_env_names_are_the_ones_the_project_reads(manifests):
    from spectune.workers.serve.served_config import ENV_API_KEY

    names = {env["name"] for kind in ("RayJob", "RayService")
             for container in containers(cluster_spec(manifests, kind)) for env in container.get("env", [])}
    assert names == {"SPECTUNE_DB", ENV_API_KEY, "HF_TOKEN"}
    head_env = {e["name"] for e in containers(cluster_spec(manifests, "RayJob"))[0]["env"]}
    assert "SPECTUNE_DB" in head_env, "the sweep driver runs on the head and reads the store URL there"


def serve_application(manifests: dict[str, Any]) -> dict[str, Any]:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(manifests["RayService"]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema for serve configs
    (application,) = config["applications"]
    return application


def test_rayservice_builds_the_endpoint_app_from_the_best_trial_of_the_rayjobs_sweep(manifests):
    from spectune.workers.serve.served_config import ServeArgs

    application = serve_application(manifests)
    module_name, _, attribute = application["import_path"].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:  # a typo in the manifest: the RayService would never start
        pytest.fail(f"the RayService's import_path {application['import_path']!r} names no module: {err}")
    assert callable(getattr(module, attribute, None)), f"{application['import_path']!r}: no such callable"
    args = ServeArgs.model_validate(application["args"])
    assert args.sweep == gpu_spec().name and args.db is None, "serve the RayJob's sweep; the URL from $SPECTUNE_DB"


def test_rayservice_deployment_options_fit_the_gpu_workers(manifests):
    from ray.serve.schema import DeploymentSchema

    from spectune.workers.serve.app import DEPLOYMENT_NAME

    (deployment,) = serve_application(manifests)["deployments"]
    assert deployment["name"] == DEPLOYMENT_NAME
    assert set(deployment) <= set(DeploymentSchema.model_fields), set(deployment) - set(DeploymentSchema.model_fields)
    per_replica = deployment["ray_actor_options"]["num_gpus"]
    most_replicas = deployment["autoscaling_config"]["max_replicas"]
    (group,) = cluster_spec(manifests, "RayService")["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert 0 < per_replica <= gpus(container)
    assert most_replicas * per_replica <= group["maxReplicas"] * gpus(container)
    assert cluster_spec(manifests, "RayService")["enableInTreeAutoscaling"] is True


# --- docs/cluster.md ------------------------------------------------------------------------


def _docker_compose_words(words: list[str]) -> tuple[list[str], list[str], str, list[str]]:
    files, profiles, rest = [], [], []
    it = iter(words)
    for word in it:
        if word == "-f":
            files.append(next(it))
        elif word == "--profile":
            profiles.append(next(it))
        else:
            rest.append(word)
    return files, profiles, rest[0], rest[1:]


def _check_docker_compose(words: list[str], compose: dict[str, Any]) -> list[Parsed]:
    files, profiles, subcommand, args = _docker_compose_words(words)
    assert files == ["docker/compose.yaml"], shlex.join(words)
    declared_profiles = {p for s in services(compose).values() for p in s.get("profiles", [])}
    assert set(profiles) <= declared_profiles, profiles
    if subcommand == "exec":
        first = next(n for n, word in enumerate(args) if not word.startswith("-"))
        service, command = args[first], args[first + 1:]
        assert service in services(compose), service
        return [parse_command(command)] if checked_program(command) else []
    named = []
    it = iter(args)
    for word in it:
        if word == "--scale":
            named.append(next(it).split("=")[0])
        elif not word.startswith("-"):
            named.append(word)
    assert set(named) <= set(services(compose)), f"unknown services {set(named) - set(services(compose))}"
    return []


def _check_docker(words: list[str], manifests: dict[str, Any]) -> None:
    images = {c["image"] for kind in ("RayJob", "RayService") for c in containers(cluster_spec(manifests, kind))}
    if words[1] == "build":
        dockerfile, tag = words[words.index("-f") + 1], words[words.index("-t") + 1]
        assert (ROOT / dockerfile).is_file() and words[-1] == "."
        variant = next(v for v, path in DOCKERFILES.items() if path == ROOT / dockerfile)
        assert tag == f"spectune:{project_version()}-{IMAGE_SUFFIX[variant]}"
    elif words[1] in ("tag", "push"):
        assert words[-1] in images, f"{shlex.join(words)}: the manifests run {images}"


def _check_kubectl(words: list[str], manifests: dict[str, Any]) -> None:
    names = {"rayjob": manifests["RayJob"]["metadata"]["name"], "rayservice": manifests["RayService"]["metadata"]["name"]}
    if words[1] == "apply":
        assert (ROOT / words[words.index("-f") + 1]).is_file()
    elif words[1] == "get":
        assert words[3] == names[words[2]]
    elif words[1] == "logs":
        assert words[-1] == f"job/{names['rayjob']}"  # the submitter Job is named after the RayJob
    elif words[1] == "port-forward":
        assert words[2] == f"svc/{names['rayservice']}-serve-svc"


def test_docs_commands_parse_and_name_what_the_stack_has(doc_commands, compose, manifests):
    parsed: list[Parsed] = []
    for words in doc_commands:
        if checked_program(words):
            parsed.append(parse_command(words))
        elif words[:2] == ["docker", "compose"]:
            parsed.extend(_check_docker_compose(words[2:], compose))
        elif words[0] == "docker":
            _check_docker(words, manifests)
        elif words[0] == "kubectl":
            _check_kubectl(words, manifests)
    for submit in (p for p in parsed if p.command == "ray job submit"):
        for sweep in (n for n in submit.nested if n.command == "spectune sweep"):
            spec = ROOT / (submit.params["working_dir"] or ".") / sweep.params["spec"]
            assert spec.is_file(), f"the job would not find {spec.relative_to(ROOT)}"
    for sweep in (p for p in parsed if p.command == "spectune sweep"):
        assert (ROOT / sweep.params["spec"]).is_file()
    kinds = {p.command for p in flatten(parsed)}
    assert {"spectune sweep", "ray job submit", "spectune serve", "spectune results"} <= kinds


def test_docs_name_the_services_secrets_variables_and_files_of_the_stack(compose, manifests):
    text = DOCS.read_text(encoding="utf-8")
    env_names = {name for s in services(compose).values() for name in (s.get("environment") or {})}
    env_names |= {e["name"] for kind in ("RayJob", "RayService") for c in containers(cluster_spec(manifests, kind))
                  for e in c.get("env", [])}
    env_names |= {"RAY_AUTH_TOKEN"}  # the token itself (compose secret source, KubeRay's variable)
    env_names -= {"POSTGRES_USER", "POSTGRES_DB"}  # the postgres image's own settings
    words = set(re.findall(r"[\w.:/-]+", text))
    for name in sorted(SERVICES | env_names | set(manifests["Secret"]) | {f"spectune:{project_version()}-cpu",
                                                                         f"spectune:{project_version()}-cuda"}):
        assert name in words or f"`{name}`" in text, f"docs/cluster.md does not mention {name}"
    for span in re.findall(r"`([^`\n]+)`", text):
        for path in re.findall(r"(?<![\w.~/])((?:docker|sweeps|workers|docs)/[\w.*/-]*\w)", span):
            if path in ("docker/.env",):  # created by the user from docker/.env.example
                continue
            assert list(ROOT.glob(path)), f"docs/cluster.md names {path}, which does not exist"
