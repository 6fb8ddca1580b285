"""Real processes on 127.0.0.1: `kvpilot serve` on the tiny checkpoint, and `kvpilot router` in front."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.api.conftest import wait_ready

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(base_url: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples (any suffix-free sample name) whose labels include `labels`."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def wait_for(condition, timeout: float = 60, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{message} not met after {timeout} s")


class Process:
    def __init__(self, command: list[str], log_path: Path, port: int):
        self.command, self.log_path, self.port = command, log_path, port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Process":
        if self.process is None:
            log = self.log_path.open("ab")
            env = os.environ | {"OMP_NUM_THREADS": "1"}
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_ready(self, timeout: float = 180) -> "Process":
        wait_ready(self.url, timeout)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def serve_process(model: Path, log_dir: Path, name: str) -> Process:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "kvpilot.serving.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
    ]
    command += ["--served-model-name", MODEL, "--num-kv-blocks", "1024", "--no-access-log"]
    return Process(command, log_dir / f"{name}.log", port)


class Router(Process):
    """`kvpilot router` (run with -X importtime, so its log shows every module it imported)."""

    def __init__(self, directory: Path, config: dict, max_body_bytes: int = 65536):
        self.config_path = directory / "router.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        port = free_port()
        command = [sys.executable, "-X", "importtime", "-m", "kvpilot.serving.cli", "router"]
        command += ["--config", str(self.config_path), "--host", "127.0.0.1", "--port", str(port)]
        command += ["--probe-interval", "0.3", "--max-body-bytes", str(max_body_bytes)]
        super().__init__(command, directory / "router.log", port)

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.url, name, **labels)

    def write(self, text: str) -> None:
        """Replace the config file in one step, as a ConfigMap volume update does."""
        staged = self.config_path.with_suffix(".new")
        staged.write_text(text)
        staged.replace(self.config_path)

    def configure(self, config: dict) -> None:
        """A new config, once the router says it reloaded it (at once when it is the one in use)."""
        text = yaml.safe_dump(config)
        if self.config_path.read_text() == text:
            return  # an unchanged file is no reload
        before = self.metric("kvpilot_router_config_reloads_total", result="ok")
        self.write(text)
        wait_for(
            lambda: self.metric("kvpilot_router_config_reloads_total", result="ok") > before, 30, "reload"
        )

    def client(self, key: str = "no-key") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=180)


def model_config(*revisions: tuple[str, int, list[str]], balancing: str = "random", **extra) -> dict:
    revs = [{"name": name, "weight": weight, "endpoints": urls} for name, weight, urls in revisions]
    return {"name": MODEL, "revisions": revs, "balancing": balancing, **extra}


@pytest.fixture(scope="module")
def servers(tiny_llama, tmp_path_factory) -> list[Process]:
    """Two `kvpilot serve` processes, started together."""
    log_dir = tmp_path_factory.mktemp("servers")
    started = [serve_process(tiny_llama, log_dir, f"server{i}").start() for i in range(2)]
    try:
        for server in started:
            server.wait_ready()
        yield started
    finally:
        for server in started:
            server.kill()  # no drain to wait for: the tests are done with them


@pytest.fixture(scope="module")
def spare_server(tiny_llama, tmp_path_factory) -> Process:
    """A third server, not started: the tests start (scale from zero) and kill (failover) it."""
    server = serve_process(tiny_llama, tmp_path_factory.mktemp("spare"), "spare")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def router(servers, tmp_path_factory) -> Router:
    config = {"models": [model_config(("all", 100, [s.url for s in servers]))]}
    process = Router(tmp_path_factory.mktemp("router"), config).start()
    try:
        process.wait_ready(60)
        yield process
    finally:
        process.stop()


def successes(server: Process) -> float:
    return metric(server.url, "vllm:request_success_total")
