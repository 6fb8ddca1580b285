"""Prometheus metrics with vLLM's names (from `contract`), one registry per app.

Gauges and counters the engine keeps are read from `EngineStats` at scrape time by a collector;
per-request histograms are observed from each request's timestamps (`RequestOutput.times`).
"""

import time
from collections.abc import Callable, Iterator

from kvpilot.serving import contract as c
from kvpilot.serving.engine.outputs import RequestOutput
from kvpilot.serving.engine.stats import EngineStats
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


TOKEN_BUCKETS_UP_TO = 1 << 20  # any context length a model has (the metrics exist before it loads)


def token_count_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_model_len (vLLM's build_1_2_5_buckets)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return buckets
            buckets.append(value)
        exponent += 1


class EngineStatsCollector(Collector):
    """Gauges and counters read from the engine when Prometheus scrapes."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.get_stats: Callable[[], EngineStats] | None = None  # set once the engine has loaded
        self.weight_bytes: int | None = None
        self.cache_labels: dict[str, str] = {}  # more cache_config_info labels, e.g. why this many blocks

    def collect(self) -> Iterator[Metric]:
        if self.get_stats is None:
            return
        stats = self.get_stats()
        label = [c.MODEL_NAME_LABEL]
        gauges = (
            (
                c.METRIC_NUM_REQUESTS_RUNNING,
                "Number of requests in model execution batches.",
                stats.num_running,
            ),
            (c.METRIC_NUM_REQUESTS_WAITING, "Number of requests waiting to be processed.", stats.num_waiting),
            (c.METRIC_KV_CACHE_USAGE, "KV-cache usage. 1 means 100 percent usage.", stats.kv_cache_usage),
        )
        for name, documentation, value in gauges:
            family = GaugeMetricFamily(name, documentation, labels=label)
            family.add_metric([self.model_name], value)
            yield family
        counters = (
            (c.METRIC_PROMPT_TOKENS, "Number of prefill tokens processed.", stats.prompt_tokens),
            (c.METRIC_GENERATION_TOKENS, "Number of generation tokens processed.", stats.generation_tokens),
            (c.METRIC_NUM_PREEMPTIONS, "Cumulative number of preemptions.", stats.num_preemptions),
            (c.METRIC_PREFIX_CACHE_QUERIES, "Prefix cache queries, in terms of number of queried tokens.",
             stats.prefix_cache_queries),
            (c.METRIC_PREFIX_CACHE_HITS, "Prefix cache hits, in terms of number of cached tokens.",
             stats.prefix_cache_hits),
        )  # fmt: skip
        for name, documentation, value in counters:
            family = CounterMetricFamily(name, documentation, labels=label)
            family.add_metric([self.model_name], value)
            yield family
        info = GaugeMetricFamily(
            c.METRIC_CACHE_CONFIG_INFO,
            "Information of the KV cache configuration.",
            labels=[*label, "block_size", "num_gpu_blocks", *self.cache_labels],
        )
        info.add_metric(
            [self.model_name, str(stats.block_size), str(stats.num_kv_blocks), *self.cache_labels.values()], 1
        )
        yield info
        if self.weight_bytes is not None:
            weights = GaugeMetricFamily(
                c.METRIC_MODEL_WEIGHT_BYTES, "Bytes of model weights held in memory.", labels=label
            )
            weights.add_metric([self.model_name], self.weight_bytes)
            yield weights


class ServerMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.engine_collector = EngineStatsCollector(model_name)
        self.registry.register(self.engine_collector)
        labels = [c.MODEL_NAME_LABEL]

        def histogram(name: str, documentation: str, buckets) -> Histogram:
            metric = Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)
            return metric.labels(model_name)

        self.request_success = Counter(
            c.METRIC_REQUEST_SUCCESS,
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        self.time_to_first_token = histogram(
            c.METRIC_TIME_TO_FIRST_TOKEN, "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            c.METRIC_INTER_TOKEN_LATENCY, "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            c.METRIC_E2E_REQUEST_LATENCY,
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_queue_time = histogram(
            c.METRIC_REQUEST_QUEUE_TIME,
            "Histogram of time spent waiting in the queue.",
            REQUEST_LATENCY_BUCKETS,
        )
        token_buckets = token_count_buckets(TOKEN_BUCKETS_UP_TO)
        self.request_prompt_tokens = histogram(
            c.METRIC_REQUEST_PROMPT_TOKENS, "Number of prefill tokens processed per request.", token_buckets
        )
        self.request_generation_tokens = histogram(
            c.METRIC_REQUEST_GENERATION_TOKENS,
            "Number of generation tokens processed per request.",
            token_buckets,
        )

    def attach_engine(
        self,
        get_stats: Callable[[], EngineStats],
        weight_bytes: int | None,
        cache_labels: dict[str, str] | None = None,
    ) -> None:
        self.engine_collector.get_stats = get_stats
        self.engine_collector.weight_bytes = weight_bytes
        self.engine_collector.cache_labels = dict(cache_labels or {})

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestObserver:
    """Follows one engine request's outputs and records its histograms when it finishes."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.num_tokens = 0  # per sequence (the longest of the n)
        self.last_token_time: float | None = None
        self.finished = False

    def on_output(self, output: RequestOutput) -> None:
        num_tokens = max((len(seq.token_ids) for seq in output.outputs), default=0)
        new_tokens = num_tokens - self.num_tokens
        times = output.times
        if new_tokens > 0 and times is not None and times.last_token is not None:
            if self.last_token_time is not None and times.last_token > self.last_token_time:
                gap = (times.last_token - self.last_token_time) / new_tokens
                for _ in range(new_tokens):
                    self.metrics.inter_token_latency.observe(gap)
            self.last_token_time = times.last_token
        self.num_tokens = max(num_tokens, self.num_tokens)
        if output.finished:
            self._on_finished(output)

    def on_aborted(self, num_sequences: int) -> None:
        self.finished = True
        self.metrics.request_success.labels(self.metrics.model_name, "abort").inc(num_sequences)

    def _on_finished(self, output: RequestOutput) -> None:
        self.finished = True
        m = self.metrics
        for seq in output.outputs:
            m.request_success.labels(m.model_name, seq.finish_reason or "abort").inc()
        m.request_prompt_tokens.observe(len(output.prompt_token_ids))
        m.request_generation_tokens.observe(sum(len(seq.token_ids) for seq in output.outputs))
        times = output.times
        if times is None:
            return
        if times.first_token is not None:
            m.time_to_first_token.observe(times.first_token - times.arrival)
        if times.first_scheduled is not None:
            m.request_queue_time.observe(times.first_scheduled - times.arrival)
        finished = times.finished if times.finished is not None else time.monotonic()
        m.e2e_request_latency.observe(finished - times.arrival)
