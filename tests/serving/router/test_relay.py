"""How a relayed stream is counted when the client goes away: before the end it is a 499 (the
server aborts the request), right after the last event it is the upstream's own 200."""

import asyncio
from dataclasses import dataclass, field

import httpx
import pytest
from kvpilot.serving.router.proxy import Relay

FIRST, LAST = b'data: {"choices":[{"text":"Paris"}]}\n\n', b"data: [DONE]\n\n"


class ServerEvents(httpx.AsyncByteStream):
    """The server's stream: the first event, then the last one, or nothing more for a while."""

    def __init__(self, finished: bool):
        self.finished = finished

    async def __aiter__(self):
        yield FIRST
        if not self.finished:
            await asyncio.Event().wait()  # still generating when the client leaves
        yield LAST


@dataclass
class RecordingUpstream:
    """What Relay reads of an Upstream, recording the code it finishes with."""

    response: httpx.Response
    first_byte: float | None = None
    codes: list[int] = field(default_factory=list)

    def header_dict(self) -> dict[str, str]:
        return {"content-type": "text/event-stream"}

    async def finish(self, code: int) -> None:
        self.codes.append(code)


def relay_until_the_client_leaves(leave_after: bytes) -> list[int]:
    """The client disconnects once it has received `leave_after`; its last frame never goes out."""
    events = ServerEvents(finished=leave_after == LAST)
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=events)
    upstream = RecordingUpstream(response)
    received = b""
    gone = asyncio.Event()

    async def send(message: dict) -> None:
        nonlocal received
        received += message.get("body", b"")
        if leave_after in received:
            gone.set()
        if message["type"] == "http.response.body" and not message["more_body"]:
            await asyncio.Event().wait()  # the closing frame never reaches a client that left

    async def receive() -> dict:
        await gone.wait()
        return {"type": "http.disconnect"}

    asyncio.run(Relay(upstream)({"type": "http"}, receive, send))
    return upstream.codes


@pytest.mark.parametrize(
    ("leave_after", "code"),
    [(FIRST, 499), (LAST, 200)],
    ids=["mid-stream", "after-the-last-event"],
)
def test_a_client_leaving_counts_as_499_only_before_the_last_event(leave_after, code):
    assert relay_until_the_client_leaves(leave_after) == [code]
