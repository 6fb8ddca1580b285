"""Everything the router holds while it runs: the current config and what is built from it
(routing table, tenants), the endpoints, the activation queue, metrics, the upstream client.

`reload()` swaps in a new config only when all of it is good (the YAML, the key files, the
upstream key); otherwise the last good config stays and the failure is logged and counted.
Requests in flight keep the endpoints and tenant they started with.
"""

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import httpx
from kvpilot.serving.router.activation import DEFAULT_MAX_BYTES, ActivationQueue
from kvpilot.serving.router.config import ConfigError, RouterConfig, load_config, read_key_file
from kvpilot.serving.router.endpoints import Endpoint, EndpointRegistry
from kvpilot.serving.router.metering import ConfiguredLabels, RouterMetrics
from kvpilot.serving.router.routing import RoutingTable
from kvpilot.serving.router.tenants import Tenants

logger = logging.getLogger("kvpilot.serving.router")


@dataclass(frozen=True)
class RouterSettings:
    config_path: Path
    host: str = "0.0.0.0"
    port: int = 8080
    max_body_bytes: int = 4 << 20
    probe_interval: float = 2.0  # seconds between /ready polls of each endpoint
    max_held_bytes: int = DEFAULT_MAX_BYTES  # request bodies held for scale from zero, all models
    reload_interval: float = 1.0  # seconds between checks of the config file


@dataclass(frozen=True)
class Loaded:
    """One good config and what was built from it."""

    config: RouterConfig
    table: RoutingTable
    tenants: Tenants
    upstream_key: str | None
    fingerprint: str
    labels: ConfiguredLabels  # the metric label values this config makes live


class RouterState:
    def __init__(self, settings: RouterSettings):
        self.settings = settings
        self.metrics = RouterMetrics()
        self.registry = EndpointRegistry()
        self.activation = ActivationQueue(on_change=self._held_changed, max_bytes=settings.max_held_bytes)
        self.loaded: Loaded | None = None
        self.client: httpx.AsyncClient | None = None
        self.on_endpoints_changed = lambda: None  # set by the app: wake the prober
        self.closing = False  # shutting down: nothing more is held for scale from zero

    def load(self) -> Loaded:
        """Load the config file and everything it names; ConfigError if any of it is bad."""
        config = load_config(self.settings.config_path)
        previous = self.loaded.tenants if self.loaded is not None else None
        tenants = Tenants(config, previous)
        upstream_key = None
        if config.upstream_api_key_file is not None:
            upstream_key = read_key_file(config.upstream_api_key_file, "upstreamApiKeyFile")
        table = RoutingTable(config, self.registry)
        return Loaded(
            config, table, tenants, upstream_key, self.fingerprint(config), ConfiguredLabels.of(config)
        )

    def fingerprint(self, config: RouterConfig | None) -> str:
        """A digest of the config file and the key files it names: any change means reload."""
        digest = hashlib.sha256()
        paths = [self.settings.config_path]
        if config is not None:
            paths += [Path(t.key_file) for t in config.tenants or () if t.key_file is not None]
            paths += [Path(config.upstream_api_key_file)] if config.upstream_api_key_file else []
        for path in paths:
            try:
                digest.update(path.read_bytes())
            except OSError:
                digest.update(b"<unreadable>")
            digest.update(b"\0")
        return digest.hexdigest()

    def reload(self) -> bool:
        """Load again; True when a new config is in use."""
        try:
            loaded = self.load()
        except ConfigError as exc:
            self.metrics.config_reloads.labels("error").inc()
            self.metrics.config_last_reload_ok.set(0)
            if self.loaded is None:
                raise
            self.loaded = dataclasses.replace(self.loaded, fingerprint=self.fingerprint(self.loaded.config))
            logger.error("config reload failed, keeping the last good config: %s", exc)
            return False
        first = self.loaded is None
        self.loaded = loaded
        self.metrics.config_reloads.labels("ok").inc()
        self.metrics.config_last_reload_ok.set(1)
        self.metrics.prune(loaded.labels)
        models = ", ".join(model.name for model in loaded.config.models)
        logger.info("config %s: models %s", "loaded" if first else "reloaded", models)
        self.on_endpoints_changed()
        return True

    def forget_if_gone(self, **labels: str) -> None:
        """After a request of a model, revision, endpoint or tenant that a reload removed: drop the
        series its metering recreated (and the in-flight gauge's, once at 0)."""
        if self.loaded is not None and not self.loaded.labels.holds(labels):
            self.metrics.prune(self.loaded.labels)

    def _held_changed(self, model: str, held: int) -> None:
        self.metrics.queued.labels(model).set(held)
        self.forget_if_gone(model=model)

    def changed_on_disk(self) -> bool:
        current = self.loaded.config if self.loaded is not None else None
        return self.loaded is None or self.fingerprint(current) != self.loaded.fingerprint

    def endpoints(self) -> list[Endpoint]:
        return list(self.registry.endpoints.values())

    def stop_holding(self) -> None:
        """Shutting down (SIGTERM): every held request is woken and answers 503 (it would otherwise
        wait out activation.timeout, past the pod's grace period, and lose its connection)."""
        self.closing = True
        for name in list(self.activation.waiting):
            self.activation.release(name)

    def release_held(self) -> None:
        """Wake held requests of every model that now has a ready endpoint, and of every model a
        reload removed (they answer 404 at once instead of waiting out activation.timeout)."""
        if self.loaded is None:
            return
        for name in [name for name in self.activation.waiting if self.activation.held(name)]:
            table = self.loaded.table.models.get(name)
            if table is None or table.has_ready_endpoint():
                self.activation.release(name)
