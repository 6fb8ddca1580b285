"""`kvpilot demo` (the README's run command) end to end, on the tiny checkpoint instead of SmolLM2."""

import subprocess
import sys


def test_demo_serves_one_chat_answer_and_stops_the_server(tiny_llama):
    command = [
        sys.executable,
        "-m",
        "kvpilot.serving.cli",
        "demo",
        "--model",
        str(tiny_llama),
        "--max-tokens",
        "4",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "user: What is the capital of France?" in done.stdout
    answer = next(line for line in done.stdout.splitlines() if line.startswith("assistant: "))
    assert len(answer) > len("assistant: ")
    assert "SIGTERM: draining" in done.stderr and "Finished server process" in done.stderr
    assert '"GET /ready' not in done.stderr  # --no-access-log
