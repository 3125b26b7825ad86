"""The blocking facade: SyncSDClient and generate_sync, from scripts, threads and running loops."""

from __future__ import annotations

import asyncio
import threading

import pytest
from client_harness import FAST, MODEL_ID

import sdclient
from sdclient import SyncSDClient, generate_sync
from sdclient.testing import InferenceTestServer, Reply


def test_sync_client_generates(server: InferenceTestServer, http_backend: str):
    events: list[sdclient.GenerationEvent] = []
    with SyncSDClient(
        server.model_url(MODEL_ID),
        on_event=events.append,
        retry=FAST,
        http_backend="aiohttp" if http_backend == "aiohttp" else "httpx",
    ) as client:
        server.enqueue(Reply.html(502), Reply.image())
        image = client.generate("a fox", seed=3, width=72)
        images = client.generate_many(["a", "b", "c"], concurrency=2)

        assert image.seed == 3 and image.width == 72 and image.attempts == 2
        assert [i.request.prompt for i in images] == ["a", "b", "c"]
        assert client.usage.total.images == 4
        assert client.status.state == "ready"
        assert client.model == server.model_url(MODEL_ID)
    assert [e.kind for e in events].count("done") == 4


def test_sync_client_raises_typed_errors(server: InferenceTestServer):
    server.default = Reply.error(404, "Model user/sd-model does not exist")
    with SyncSDClient(server.model_url(MODEL_ID), retry=FAST) as client:
        with pytest.raises(sdclient.ModelNotFound):
            client.generate("a fox")
        results = client.generate_many(["a", "b"], return_exceptions=True)
    assert all(isinstance(r, sdclient.ModelNotFound) for r in results)


def test_sync_client_close_is_final(server: InferenceTestServer):
    client = SyncSDClient(server.model_url(MODEL_ID))
    thread = client._thread
    client.close()
    client.close()  # twice is fine
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        client.generate("a fox")


def test_sync_client_bad_arguments_stop_the_thread():
    before = threading.active_count()
    with pytest.raises(ValueError, match="Hub model id"):
        SyncSDClient("not a model")
    assert threading.active_count() == before


def test_generate_sync(server: InferenceTestServer):
    image = generate_sync("a fox", model=server.model_url(MODEL_ID), seed=11, height=40)
    assert image.seed == 11 and image.height == 40
    assert server.requests[0].parameters == {"seed": 11, "height": 40}


async def test_generate_sync_inside_a_running_loop(server: InferenceTestServer):
    # A notebook cell: an event loop is running in this thread, and asyncio.run would refuse.
    assert asyncio.get_running_loop().is_running()
    image = generate_sync("a fox", model=server.model_url(MODEL_ID))
    assert image.attempts == 1


async def test_sync_client_from_a_thread_while_another_loop_runs(server: InferenceTestServer):
    with SyncSDClient(server.model_url(MODEL_ID)) as client:
        images = await asyncio.gather(*(asyncio.to_thread(client.generate, f"fox {i}") for i in range(4)))
    assert len({image.request.prompt for image in images}) == 4


def test_sync_hook_cannot_call_back_into_the_client(server: InferenceTestServer):
    errors: list[BaseException] = []

    def hook(event: sdclient.GenerationEvent) -> None:
        if event.kind == "done":
            try:
                client.generate("again")
            except RuntimeError as exc:
                errors.append(exc)

    with SyncSDClient(server.model_url(MODEL_ID), on_event=hook) as client:
        client.generate("a fox")
    assert len(errors) == 1 and "own on_event hook" in str(errors[0])
