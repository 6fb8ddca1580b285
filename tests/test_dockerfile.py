"""The Dockerfile, checked without a container builder: hadolint (the linter, from its PyPI wheel),
BuildKit's own parser (the `dockerfile` package) for its structure, and the project's other
declarations (pyproject.toml, the Makefile, the operator's builders, the chart) for its values."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
import pytest
import yaml
from kvpilot.operator.api import DEFAULT_CUDA_IMAGE, DEFAULT_IMAGE, InferenceService
from kvpilot.operator.builders import build_deployment
from kvpilot.operator.containers import RUN_AS_USER

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMMANDS = dockerfile.parse_file(str(ROOT / "Dockerfile"))


def stages() -> dict[str, list[dockerfile.Command]]:
    """Stage name -> its instructions (FROM included)."""
    found: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] = []
    for command in COMMANDS:
        if command.cmd == "FROM":
            current = [command]
            found[command.value[-1]] = current
        elif found:
            current.append(command)
    return found


def global_args() -> dict[str, str]:
    args = {}
    for command in COMMANDS:
        if command.cmd == "FROM":
            break
        if command.cmd == "ARG" and "=" in command.value[0]:
            name, _, value = command.value[0].partition("=")
            args[name] = value
    return args


def only(stage: str, cmd: str) -> dockerfile.Command:
    (command,) = [c for c in stages()[stage] if c.cmd == cmd]
    return command


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_copied_file_exists_and_passes_the_dockerignore():
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copies = [c for c in COMMANDS if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)]
    assert copies
    for copy in copies:
        for source in copy.value[:-1]:
            assert (ROOT / source).exists(), f"{copy.original}: {source} does not exist"
            assert source.rstrip("/") in allowed, f"{copy.original}: {source} is excluded by .dockerignore"
    # Everything setuptools packages is copied: the install in the image would miss a package otherwise.
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= {source for copy in copies for source in copy.value[:-1]}


@pytest.mark.parametrize("stage", ["cpu", "cuda"])
def test_final_images_run_kvpilot_as_the_operator_renders_it(stage):
    entrypoint, cmd = only(stage, "ENTRYPOINT"), only(stage, "CMD")
    assert entrypoint.json and cmd.json
    image_command = [*entrypoint.value, *cmd.value]
    for gpus in (0, 1):
        body = {"metadata": {"name": "m"}, "spec": {"model": {"name": "m", "uri": "pvc://models/m"}}}
        body["spec"]["resources"] = {"gpu": {"count": gpus}}
        server = build_deployment(InferenceService.from_body(body))["spec"]["template"]["spec"]
        assert server["containers"][0]["command"] == image_command  # `kvpilot serve`
        assert server["securityContext"]["runAsUser"] == RUN_AS_USER
        assert server["containers"][0]["image"] == (DEFAULT_CUDA_IMAGE if gpus else DEFAULT_IMAGE)
    chart = (ROOT / "charts" / "kvpilot" / "templates" / "deployment.yaml").read_text()
    assert f'command: ["{entrypoint.value[0]}", "operator"]' in chart  # the operator: same image
    assert only(stage, "USER").value == (f"{RUN_AS_USER}:{RUN_AS_USER}",)
    env = " ".join(" ".join(c.value) for c in stages()[stage] if c.cmd == "ENV")
    for variable in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):  # a read-only root
        assert re.search(rf"\b{variable} /tmp\b", env), f"{variable} is not under /tmp in {stage}"


@pytest.mark.parametrize(("stage", "suffix"), [("cpu", ""), ("cuda", "-cuda")])
def test_labels_and_tags_carry_the_project_version(stage, suffix):
    version = PYPROJECT["project"]["version"]
    assert global_args()["VERSION"] == version
    values = [value.strip('"') for value in only(stage, "LABEL").value]
    labels = dict(zip(values[::2], values[1::2], strict=True))
    for key in ("title", "description", "version", "source", "licenses"):
        assert f"org.opencontainers.image.{key}" in labels
    assert labels["org.opencontainers.image.version"] == f"${{VERSION}}{suffix}"
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    target = "image-cuda" if suffix else "image"
    make = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True)
    image = DEFAULT_CUDA_IMAGE if suffix else DEFAULT_IMAGE
    assert f"--target {stage} " in make.stdout and f"-t {image} ." in make.stdout
    chart = yaml.safe_load((ROOT / "charts" / "kvpilot" / "Chart.yaml").read_text())
    assert (
        DEFAULT_IMAGE
        == f"ghcr.io/kvpilot/kvpilot:{chart['appVersion']}"
        == f"ghcr.io/kvpilot/kvpilot:{version}"
    )


def test_python_torch_and_triton_match_pyproject():
    args = global_args()
    pins = dict(re.match(r"([\w-]+)==(.+)", d).groups() for d in PYPROJECT["project"]["dependencies"])
    assert args["TORCH_VERSION"] == pins["torch"]
    minimum = re.match(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).groups()
    assert tuple(map(int, args["PYTHON_VERSION"].split("."))) >= tuple(map(int, minimum))
    # The CUDA base's python3 is the same minor version (Ubuntu 24.04 ships 3.12).
    cuda_python = " ".join(c.original for c in stages()["cuda-base"] if c.cmd == "RUN")
    assert f"python3={args['PYTHON_VERSION']}.*" in cuda_python
    assert "ubuntu24.04" in stages()["cuda-base"][0].value[0] and args["PYTHON_VERSION"] == "3.12"
    # Triton comes with the gpu extra, pinned there; only the CUDA image installs it.
    assert any(d.startswith("triton==") for d in PYPROJECT["project"]["optional-dependencies"]["gpu"])
    runs = {
        stage: " ".join(c.original for c in commands if c.cmd == "RUN")
        for stage, commands in stages().items()
    }
    assert '".[gpu]"' in runs["cuda-builder"] and "[gpu]" not in runs["cpu-builder"]
    assert "whl/cpu" in runs["cpu-builder"] and "TORCH_CUDA_INDEX" in runs["cuda-builder"]
    # The default model's wheel is the one `make install` pins.
    assert args["DEFAULT_MODEL_WHEEL"] in (ROOT / "Makefile").read_text()
