"""The routing table of one config: models -> revisions (weight, endpoints, balancer).

Built on each (re)load from the immutable config and the long-lived `EndpointRegistry`, so
endpoint state survives a reload. Choosing is two steps: a revision by weight (smooth weighted
round-robin) among those with an available endpoint, then an endpoint inside it by the model's
balancing policy.
"""

from dataclasses import dataclass, field

from kvpilot.serving.router.balancing import Balancer, make_balancer
from kvpilot.serving.router.config import ModelRoute, RouterConfig
from kvpilot.serving.router.endpoints import Endpoint, EndpointRegistry
from kvpilot.serving.router.weights import WeightedRoundRobin


@dataclass
class RevisionRoute:
    name: str
    weight: int
    endpoints: list[Endpoint]
    balancer: Balancer

    def available(self, now: float | None = None) -> list[Endpoint]:
        return [endpoint for endpoint in self.endpoints if endpoint.is_available(now)]


@dataclass
class ModelTable:
    route: ModelRoute
    revisions: list[RevisionRoute]
    weights: WeightedRoundRobin = field(default_factory=WeightedRoundRobin)

    def choose_revision(self) -> RevisionRoute | None:
        """A revision with an available endpoint, by weight; None when there is none."""
        candidates = {revision.name: revision for revision in self.revisions if revision.available()}
        name = self.weights.pick([(name, revision.weight) for name, revision in candidates.items()])
        return candidates.get(name) if name is not None else None

    def has_ready_endpoint(self) -> bool:
        return any(revision.weight > 0 and revision.available() for revision in self.revisions)


class RoutingTable:
    def __init__(self, config: RouterConfig, registry: EndpointRegistry):
        self.models: dict[str, ModelTable] = {}
        urls: set[str] = set()
        for route in config.models:
            revisions = []
            for revision in route.revisions:
                endpoints = [registry.get(url) for url in revision.addresses]
                urls.update(revision.addresses)
                revisions.append(
                    RevisionRoute(revision.name, revision.weight, endpoints, make_balancer(route.balancing))
                )
            self.models[route.name] = ModelTable(route, revisions)
        registry.retain(urls)

    def models_of(self, endpoint: Endpoint) -> list[str]:
        return [
            name
            for name, table in self.models.items()
            if any(endpoint in revision.endpoints for revision in table.revisions)
        ]
