"""`kvpilot bench serve`: an online benchmark client for any OpenAI-compatible server.

Like vLLM's `benchmark_serving`: requests from the seeded workload arrive as a Poisson
process at `--request-rate` (or all at once with `inf`), at most `--max-concurrency` are in
flight, each streams `/v1/completions` (SSE) and the client records when each chunk arrives.
Metrics come from those timestamps (`metrics.py`).

`--structured-output json` makes it a structured workload: every request also carries a
`response_format` JSON Schema (`STRUCTURED_SCHEMA`, a list of at least 64 records), so the server
masks every token with a grammar; compare its throughput with the same run without it. The list
cannot be complete within 512 tokens, so every request still generates exactly `output_len`.
"""

import argparse
import asyncio
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from kvpilot.serving.bench.metrics import RequestRecord, ServingMetrics, compute_metrics, format_metrics
from kvpilot.serving.bench.workload import (
    WorkloadRequest,
    WorkloadSpec,
    build_workload,
    load_tokenizer,
    read_text,
    tokenize_text,
)
from tqdm import tqdm

STRUCTURED_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "title": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "done": {"type": "boolean"},
        },
        "required": ["id", "title", "tags", "done"],
    },
    "minItems": 64,  # > 512 tokens: never complete before max_tokens, so runs compare token for token
}
STRUCTURED_OUTPUTS = {
    "json": {"type": "json_schema", "json_schema": {"name": "records", "schema": STRUCTURED_SCHEMA}}
}


@dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str
    model: str | None = None  # None: the first model the server lists
    request_rate: float = math.inf  # requests/s; inf sends everything at once
    max_concurrency: int | None = None  # None: no cap
    api_key: str | None = None
    seed: int = 0
    structured_output: str | None = None  # a key of STRUCTURED_OUTPUTS: every request gets that format

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request_rate: must be > 0 or inf, got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {self.max_concurrency}")
        if self.structured_output is not None and self.structured_output not in STRUCTURED_OUTPUTS:
            raise ValueError(f"structured_output: must be one of {sorted(STRUCTURED_OUTPUTS)} or None")


def arrival_delays(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Gaps before each request: 0 for the first, then exponential (a Poisson process); all 0 at inf."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=num_requests)
    gaps[0] = 0.0
    return [float(g) for g in gaps]


def completion_body(model: str, request: WorkloadRequest, structured_output: str | None = None) -> dict:
    """A streaming greedy completion that generates exactly `request.output_len` tokens."""
    response_format = {"response_format": STRUCTURED_OUTPUTS[structured_output]} if structured_output else {}
    return response_format | {
        "model": model,
        "prompt": list(request.prompt_token_ids),
        "max_tokens": request.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send_request(
    client: httpx.AsyncClient, model: str, request: WorkloadRequest, structured_output: str | None = None
) -> RequestRecord:
    record = RequestRecord(start=time.perf_counter(), prompt_len=request.prompt_len)
    num_chunks = 0
    body = completion_body(model, request, structured_output)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:300]
                record.error = f"HTTP {response.status_code}: {detail}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = str(chunk["error"])
                    return record
                if chunk.get("usage"):
                    record.output_len = int(chunk["usage"]["completion_tokens"])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    record.chunk_times.append(time.perf_counter())
                    num_chunks += 1
        record.end = time.perf_counter()
        record.output_len = record.output_len or num_chunks  # a server without the usage chunk
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    return record


async def resolve_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    models = response.json()["data"]
    if not models:
        raise RuntimeError("the server lists no models; pass --model")
    return models[0]["id"]


@dataclass(frozen=True)
class ServeRun:
    model: str  # the model name requested (resolved from /v1/models when not given)
    records: list[RequestRecord]
    duration_s: float  # wall time from the first send to the last byte


async def run_benchmark(
    config: ServeBenchConfig, requests: list[WorkloadRequest], show_progress: bool = True
) -> ServeRun:
    """Send every request and record what the client saw."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    max_in_flight = config.max_concurrency or len(requests)
    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=None)
    semaphore = asyncio.Semaphore(max_in_flight)
    progress = tqdm(total=len(requests), desc="requests", disable=not show_progress)

    client = httpx.AsyncClient(
        base_url=config.base_url, headers=headers, limits=limits, timeout=httpx.Timeout(None, connect=30.0)
    )
    async with client:
        model = config.model or await resolve_model(client)

        async def limited(request: WorkloadRequest) -> RequestRecord:
            async with semaphore:
                record = await send_request(client, model, request, config.structured_output)
            progress.update(1)
            return record

        tasks = []
        start = time.perf_counter()
        delays = arrival_delays(len(requests), config.request_rate, config.seed)
        for delay, request in zip(delays, requests, strict=True):
            if delay:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(request)))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    progress.close()
    return ServeRun(model, list(records), duration)


def result_document(config: ServeBenchConfig, run: ServeRun, metrics: ServingMetrics) -> dict:
    return {
        "base_url": config.base_url,
        "model": run.model,
        "num_prompts": len(run.records),
        "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
        "max_concurrency": config.max_concurrency,
        "structured_output": config.structured_output,
        **metrics.to_dict(),
    }


def parse_request_rate(value: str) -> float:
    rate = float(value)  # accepts "inf"
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 or inf, got {value}")
    return rate


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="benchmark a running OpenAI-compatible server (streaming)")
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    parser.add_argument("--tokenizer", default=None, help="checkpoint dir or .gguf (default: default model)")
    parser.add_argument("--num-prompts", type=positive_int, default=WorkloadSpec.num_prompts)
    parser.add_argument("--request-rate", type=parse_request_rate, default=math.inf, help="requests/s or inf")
    parser.add_argument("--max-concurrency", type=positive_int, default=None)
    parser.add_argument("--input-len", type=positive_int, default=None, help="fixed prompt length (tokens)")
    parser.add_argument("--output-len", type=positive_int, default=None, help="fixed output length (tokens)")
    parser.add_argument("--dataset", type=Path, default=None, help="English text file to cut prompts from")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--structured-output",
        choices=sorted(STRUCTURED_OUTPUTS),
        default=None,
        help="a structured workload: every request carries this response_format (json: a JSON Schema)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON to this file")
    parser.set_defaults(run=main)
    return parser


def workload_spec_from_args(args: argparse.Namespace) -> WorkloadSpec:
    defaults = WorkloadSpec()
    return WorkloadSpec(
        num_prompts=args.num_prompts,
        min_input_len=args.input_len or defaults.min_input_len,
        max_input_len=args.input_len or defaults.max_input_len,
        min_output_len=args.output_len or defaults.min_output_len,
        max_output_len=args.output_len or defaults.max_output_len,
        seed=args.seed,
    )


def main(args: argparse.Namespace) -> int:
    config = ServeBenchConfig(
        base_url=args.base_url.rstrip("/"),
        model=args.model,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        api_key=args.api_key,
        seed=args.seed,
        structured_output=args.structured_output,
    )
    tokenizer = load_tokenizer(args.tokenizer)
    text_token_ids = tokenize_text(tokenizer, read_text(args.dataset))
    requests = build_workload(text_token_ids, workload_spec_from_args(args))
    try:
        run = asyncio.run(run_benchmark(config, requests))
    except httpx.HTTPError as exc:  # the server is unreachable or /v1/models failed
        print(f"error: --base-url {config.base_url}: {type(exc).__name__}: {exc}")
        return 2
    metrics = compute_metrics(run.records, run.duration_s)
    print(format_metrics(metrics))
    for error in sorted({r.error for r in run.records if r.error})[:5]:
        print(f"error: {error}")
    if args.json:
        args.json.write_text(json.dumps(result_document(config, run, metrics), indent=2) + "\n")
    return 0 if metrics.errors == 0 else 1
