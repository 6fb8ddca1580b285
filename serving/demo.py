"""`kvpilot demo`: start a real server on the default model, ask one chat question, print the answer."""

import logging
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(base_url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server was not ready within {timeout:.0f} s")


def run_demo(model: str | None, prompt: str, max_tokens: int, timeout: float = 600) -> int:
    from openai import OpenAI

    for name in ("httpx", "httpx2", "openai"):  # one line per poll would bury the answer
        logging.getLogger(name).setLevel(logging.WARNING)
    port = free_port()
    flags = ["--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    if model is not None:
        flags += ["--model", model]
    print(f"$ kvpilot serve {' '.join(flags)}", flush=True)
    command = [sys.executable, "-m", "kvpilot.serving.cli", "serve", *flags]
    server = subprocess.Popen(command)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_until_ready(base_url, server, timeout)
        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused")
        model_name = client.models.list().data[0].id
        print(f"\nuser: {prompt}", flush=True)
        reply = client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
        )
        print(f"assistant: {reply.choices[0].message.content.strip()}\n", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"kvpilot demo: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="start the server on the default model, ask it one chat question, print the answer"
    )
    parser.add_argument("--model", default=None, help="checkpoint directory or .gguf file (default: SmolLM2)")
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.set_defaults(run=lambda args: run_demo(args.model, args.prompt, args.max_tokens))
