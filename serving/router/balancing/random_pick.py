"""`random`: any available endpoint, uniformly."""

import random

from kvpilot.serving.router.endpoints import Endpoint


class RandomPick:
    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def pick(self, endpoints: list[Endpoint], key: str) -> Endpoint | None:
        return self.rng.choice(endpoints) if endpoints else None
