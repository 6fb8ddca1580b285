"""Balancing inside a revision: one policy per module, behind one interface.

`Balancer.pick(endpoints, key)` returns one of the given endpoints (all available) or None.
`key` is the request's prefix key (see `prefix_key`); policies that do not need it ignore it.
"""

import json
from typing import Protocol

from kvpilot.serving.router.endpoints import Endpoint

# Characters of the prompt that the prefix policy hashes: about the first 4-8 KV blocks of 16
# tokens, enough to tell system prompts apart, short enough that requests sharing one agree.
PREFIX_WINDOW_CHARS = 512


class Balancer(Protocol):
    def pick(self, endpoints: list[Endpoint], key: str) -> Endpoint | None: ...


def prefix_key(body: dict) -> str:
    """The first PREFIX_WINDOW_CHARS of the prompt: chat messages rendered as `role: content`
    lines, a completion's prompt as given (its first prompt if a list)."""
    if "messages" in body:
        text = ""
        for message in body["messages"]:
            content = message.get("content")
            if not isinstance(content, str):
                content = json.dumps(content, sort_keys=True)
            text += f"{message.get('role')}: {content}\n"
            if len(text) >= PREFIX_WINDOW_CHARS:
                break
    else:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return text[:PREFIX_WINDOW_CHARS]


def make_balancer(policy: str) -> Balancer:
    from kvpilot.serving.router.balancing.least_request import LeastRequest
    from kvpilot.serving.router.balancing.prefix import PrefixHash
    from kvpilot.serving.router.balancing.random_pick import RandomPick

    return {"prefix": PrefixHash, "least-request": LeastRequest, "random": RandomPick}[policy]()
