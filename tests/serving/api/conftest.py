"""A real kvpilot server (uvicorn, 127.0.0.1, a free port) on the tiny Llama checkpoint, and helpers."""

import asyncio
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from kvpilot.serving.api.app import create_app
from kvpilot.serving.api.settings import ServeSettings


class ServerThread:
    """uvicorn serving `create_app(settings)` in a background thread, on a socket bound beforehand."""

    def __init__(self, settings: ServeSettings):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def state(self):
        return self.app.state.serving

    def start(self, timeout: float = 120) -> "ServerThread":
        self.thread.start()
        wait_ready(self.base_url, timeout)
        return self

    def run_coroutine(self, coroutine, timeout: float = 60):
        """Run a coroutine on the server's event loop (e.g. the drain) and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def _run(self) -> None:
        async def main():
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])

        asyncio.run(main())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`kvpilot serve` as a real process on 127.0.0.1 (its own GIL and event loop), output to a log."""

    def __init__(self, args: list[str], log: Path, preexec_fn=None):
        """`preexec_fn`: run in the child before exec (e.g. to enter a memory cgroup)."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "kvpilot.serving.cli", "serve", "--port", str(self.port), *args]
        self.log = log
        self.process = subprocess.Popen(
            command, stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=preexec_fn
        )

    def start(self, timeout: float = 120) -> "ServeProcess":
        try:
            wait_ready(self.base_url, timeout)
        except TimeoutError:
            self.stop()
            raise TimeoutError(self.log.read_text()[-3000:]) from None
        return self

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout=60)


def wait_ready(base_url: str, timeout: float = 120) -> list[int]:
    """Poll /ready until 200; returns the status codes seen (connection refusals left out)."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(httpx.get(f"{base_url}/ready", timeout=5).status_code)
            if seen[-1] == 200:
                return seen
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{base_url} not ready after {timeout} s (saw {seen[-5:]})")


def tiny_settings(model: Path, **overrides) -> ServeSettings:
    values = dict(model=str(model), served_model_name="tiny-llama", num_kv_blocks=512, max_num_seqs=64)
    return ServeSettings(**(values | overrides))


def scrape(base_url: str) -> dict[str, float]:
    """/metrics as {'name{labels}': value}, and {'name': value} for metrics with only model_name."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, value = line.rsplit(" ", 1)
        samples[key] = float(value)
        name = re.sub(r"\{model_name=\"[^\"]*\"\}$", "", key)
        samples[name] = float(value)
    return samples


@pytest.fixture(scope="package")
def api_server(tiny_llama):
    server = ServerThread(tiny_settings(tiny_llama)).start()
    yield server
    server.stop()
