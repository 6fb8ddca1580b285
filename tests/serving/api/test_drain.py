"""`kvpilot serve` as a real process: /ready 503 until warmed up, SIGTERM drains in-flight streams, exit 0."""

import json
import signal
import subprocess
import sys
import threading
import time

import httpx

from tests.serving.api.conftest import free_port, wait_ready

NUM_STREAMS = 8
MAX_TOKENS = 40


def test_sigterm_drains_in_flight_streams_then_exits_0(tiny_llama, tmp_path):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "kvpilot.serving.cli", "serve", "--model", str(tiny_llama)]
    command += ["--port", str(port), "--served-model-name", "tiny", "--num-kv-blocks", "512"]
    command += ["--shutdown-timeout", "120"]
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        seen = wait_ready(base_url, timeout=120)
        assert seen[0] == 503, f"/ready should be 503 while the model loads and warms up, saw {seen}"

        events: list[list[str]] = [[] for _ in range(NUM_STREAMS)]
        started = [threading.Event() for _ in range(NUM_STREAMS)]
        body = {"model": "tiny", "prompt": "Drain me", "max_tokens": MAX_TOKENS, "ignore_eos": True}
        body |= {"stream": True, "stream_options": {"include_usage": True}}

        def stream(i: int) -> None:
            with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events[i].append(line[6:])
                        started[i].set()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(NUM_STREAMS)]
        for thread in threads:
            thread.start()
        for event in started:
            assert event.wait(60)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        assert httpx.get(f"{base_url}/ready").status_code == 503
        late = httpx.post(
            f"{base_url}/v1/completions", json={"model": "tiny", "prompt": "late", "max_tokens": 2}
        )
        assert late.status_code == 503 and late.json()["error"]["code"] == "server_draining"
        assert httpx.get(f"{base_url}/health").status_code == 200
        assert any(len(e) < MAX_TOKENS for e in events), "the streams should still be running at SIGTERM"
        for thread in threads:
            thread.join(120)
        for received in events:
            assert received[-1] == "[DONE]"
            usage = json.loads(received[-2])["usage"]
            assert usage["completion_tokens"] == MAX_TOKENS
            finish = [c["finish_reason"] for e in received[:-2] for c in json.loads(e)["choices"]]
            assert finish[-1] == "length"
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
        print((tmp_path / "server.log").read_text()[-3000:])
