"""How a relayed stream is counted when the client goes away: before the end it is a 499 (the
server aborts the request); once the last event (`data: [DONE]`) went out it is the upstream's own
200, even though the end of the upstream's body and the closing frame had not come yet."""

import asyncio
import json
from dataclasses import dataclass, field

import httpx
import pytest
from kvpilot.serving.router.endpoints import LOST_AFTER_FAILED_PROBES, Endpoint
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
        await asyncio.Event().wait()  # the end of the body has not arrived when the client leaves


@dataclass
class RecordingUpstream:
    """What Relay reads of an Upstream, recording the code it finishes with."""

    response: httpx.Response
    first_byte: float | None = None
    codes: list[int] = field(default_factory=list)
    endpoint: Endpoint = field(default_factory=lambda: Endpoint("http://e:1", ready=True))
    events: int = 0

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


def test_a_stream_from_an_endpoint_that_stopped_answering_ends_with_an_error_event():
    """The server froze after its first event (its probes time out): the client, which stays,
    gets an OpenAI-style error event and the end of the stream, and it counts as a 502."""
    response = httpx.Response(
        200, headers={"content-type": "text/event-stream"}, stream=ServerEvents(finished=False)
    )
    upstream = RecordingUpstream(response)
    received: list[bytes] = []

    async def send(message: dict) -> None:
        received.append(message.get("body", b""))
        if FIRST in b"".join(received):
            for _ in range(LOST_AFTER_FAILED_PROBES):  # what the prober concludes
                upstream.endpoint.probe_unanswered()

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client stays
        return {}

    asyncio.run(asyncio.wait_for(Relay(upstream)({"type": "http"}, receive, send), timeout=10))
    assert upstream.codes == [502]
    body = b"".join(received)
    assert body.startswith(FIRST) and body.endswith(b"\n\n")
    error = json.loads(body[len(FIRST) :].removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_unavailable" and "stopped answering" in error["message"]


def test_events_framed_with_crlf_are_relayed_one_by_one():
    """SSE lines may end in CRLF: such a stream was held back until its end (split on LF LF only)."""

    class CrlfEvents(httpx.AsyncByteStream):
        async def __aiter__(self):
            yield FIRST.replace(b"\n", b"\r\n")
            await asyncio.Event().wait()  # still generating

    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=CrlfEvents())
    upstream = RecordingUpstream(response)
    received: list[bytes] = []
    first_relayed = asyncio.Event()

    async def send(message: dict) -> None:
        received.append(message.get("body", b""))
        if FIRST in b"".join(received):
            first_relayed.set()

    async def receive() -> dict:
        await first_relayed.wait()
        return {"type": "http.disconnect"}  # the client leaves once it has the first event

    asyncio.run(asyncio.wait_for(Relay(upstream)({"type": "http"}, receive, send), timeout=10))
    assert FIRST in b"".join(received) and upstream.codes == [499]
