"""The token never shows up: not in str()/repr(), errors, events, status, usage or log lines."""

from __future__ import annotations

import logging
import traceback

import pytest
from client_harness import SENTINEL, MakeClient

import sdclient
from sdclient import GenerationEvent
from sdclient.testing import InferenceTestServer, Reply


def assert_clean(*texts: object) -> None:
    for text in texts:
        assert SENTINEL not in str(text)
        assert SENTINEL[3:15] not in str(text)  # not even a part of it


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (
            Reply.error(401, f"Invalid credentials in Authorization header: Bearer {SENTINEL}"),
            sdclient.AuthenticationError,
        ),
        (Reply.error(400, f"bad request from token {SENTINEL}"), sdclient.InvalidRequest),
        (
            Reply.status(502, f"<html><title>gateway saw {SENTINEL}</title></html>", "text/html"),
            sdclient.ServerError,
        ),
        (Reply.status(200, f"token={SENTINEL}", "text/plain"), sdclient.InvalidImage),
        (Reply.rate_limited(retry_after=0.01), sdclient.RateLimited),
        # A server that echoes the token in every kind of answer: the loading message (which
        # becomes the client's status and its events), a request id, a long error cut short.
        (
            Reply.status(
                503, {"error": f"Model m is currently loading for {SENTINEL}", "estimated_time": 0.05}
            ),
            sdclient.ModelLoadingTimeout,
        ),
        (Reply.error(500, "boom", headers={"x-request-id": SENTINEL}), sdclient.ServerError),
        (Reply.error(422, "x" * 290 + SENTINEL + "y" * 50), sdclient.InvalidRequest),
        (Reply.reset(), sdclient.APIConnectionError),
        (Reply.hang(), sdclient.APITimeoutError),
    ],
)
async def test_token_never_leaks(
    server: InferenceTestServer,
    make_client: MakeClient,
    caplog: pytest.LogCaptureFixture,
    reply: Reply,
    error: type[Exception],
):
    caplog.set_level(logging.DEBUG)  # everything: sdclient, httpx, httpcore, asyncio
    server.default = reply
    events: list[GenerationEvent] = []
    client = make_client(
        token=SENTINEL, on_event=events.append, max_retries=1, timeout=0.2, max_wait_for_model=0.3
    )

    with pytest.raises(error) as info:
        await client.generate("a fox")

    assert server.requests[0].headers["authorization"] == f"Bearer {SENTINEL}"  # it was sent...
    exc = info.value
    formatted = "".join(traceback.format_exception(exc))
    assert_clean(str(exc), repr(exc), formatted, getattr(exc, "message", ""), exc.args)
    assert_clean(getattr(exc, "request_id", None), client.status.message)
    assert_clean(repr(client), str(client), client.status, client.usage, repr(client.usage_tracker))
    assert_clean(*events, *(e.message for e in events))
    assert_clean(caplog.text, *(r.getMessage() for r in caplog.records), *(r.args for r in caplog.records))
    assert caplog.records, "the test should see some log lines (httpx/httpcore/sdclient at DEBUG)"


async def test_token_not_in_successful_results(
    server: InferenceTestServer, make_client: MakeClient, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG)
    server.default = Reply.image(headers={"x-request-id": f"req-{SENTINEL}"})  # an echoing server
    client = make_client(token=SENTINEL)
    image = await client.generate("a fox")
    assert image.request_id == "req-***"
    assert_clean(repr(image), image.model_dump_json(exclude={"data"}), repr(client), caplog.text)
    assert_clean(repr(client._headers))  # httpx masks Authorization in repr


async def test_sync_client_repr_is_clean(server: InferenceTestServer):
    from sdclient import SyncSDClient

    with SyncSDClient(server.model_url("user/m"), token=SENTINEL) as client:
        assert_clean(repr(client))
        assert "authenticated=True" in repr(client)
