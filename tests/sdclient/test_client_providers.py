"""SDClient on Inference Providers, against the fake router: routes, queues, failures, usage, tokens."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import huggingface_hub.constants
import pytest
from client_harness import FAST, SENTINEL, FakeClock

import sdclient
from sdclient import GenerationEvent, SDClient
from sdclient.testing import FakeRouter, JobScript

MODELS: dict[str, tuple[Any, ...]] = {
    "user/sd-hf": ("hf-inference", None, None),
    "user/flux-lora": ("fal-ai", "fal-ai/flux-lora", "lora.safetensors"),
    "user/sdxl-lora": ("fal-ai", "fal-ai/lora", "pytorch_lora_weights.safetensors"),
    "user/replicate-lora": ("replicate", "owner/flux-dev-lora", "lora.safetensors"),
    "user/wavespeed": ("wavespeed", "wavespeed-ai/flux-dev-lora", "lora.safetensors"),
    "user/together": ("together", "black-forest-labs/FLUX.1-dev", None),
    "user/nscale": ("nscale", "stabilityai/stable-diffusion-xl-base-1.0", None),
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _fake_hub_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests run with HF_HUB_OFFLINE=1; the fake Hub here is on 127.0.0.1.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def router(clock: FakeClock) -> Iterator[FakeRouter]:
    with FakeRouter(clock=clock) as router:
        for model, (provider, provider_id, lora) in MODELS.items():
            router.add_model(model, provider, provider_id, lora=lora)
        yield router


@pytest.fixture
async def make(router: FakeRouter, clock: FakeClock) -> AsyncIterator[Any]:
    clients: list[SDClient] = []

    def make(model: str, **kwargs: Any) -> SDClient:
        kwargs.setdefault("token", SENTINEL)
        kwargs.setdefault("retry", FAST)
        kwargs.setdefault("max_wait_for_model", 30.0)
        client = SDClient(
            model, router_url=router.url, hub_url=router.url, clock=clock, sleep=clock.sleep, **kwargs
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.mark.parametrize("model", list(MODELS))
async def test_every_provider_generates(router: FakeRouter, make: Any, model: str):
    provider, provider_id, _ = MODELS[model]
    client = make(model)
    image = await client.generate("a red fox", width=96, height=64, seed=7)
    assert (image.width, image.height) == (96, 64) and image.format == "png"
    assert image.provider == provider
    assert client.route is not None and client.route.provider == provider
    assert client.route.provider_model == (provider_id or model)
    assert SENTINEL not in repr(client.route)
    # The image host is not a Hugging Face host: it never sees the token.
    for request in router.requests:
        if request.host == "images":
            assert request.authorization is None
        elif request.path.startswith(("/api/", f"/{provider}/")):
            assert request.authorization == f"Bearer {SENTINEL}"


async def test_the_hub_is_asked_once_per_client(router: FakeRouter, make: Any):
    client = make("user/flux-lora")
    await client.generate("a", seed=1)
    await client.generate("b", seed=2)
    assert sum(r.path.startswith("/api/models/") for r in router.requests) == 1


async def test_auto_uses_the_first_live_provider(router: FakeRouter, make: Any):
    router.add_model("user/multi", "replicate", "owner/x", status="staging")
    router.add_model("user/multi", "together", "org/x")
    route = await make("user/multi").resolve_route()
    assert route.provider == "together"
    staging = await make("user/multi", provider="replicate").resolve_route()
    assert staging.provider == "replicate"


async def test_a_provider_that_does_not_serve_the_model_is_named_clearly(make: Any):
    with pytest.raises(sdclient.ProviderNotAvailable) as info:
        await make("user/flux-lora", provider="replicate").generate("a fox")
    assert "fal-ai" in str(info.value) and "provider=" in str(info.value)
    assert info.value.providers == ["fal-ai"]


async def test_a_full_fine_tune_without_providers_points_at_endpoints(router: FakeRouter, make: Any):
    router.add_model("user/unsupported", "hf-inference", status="error")
    with pytest.raises(sdclient.ProviderNotAvailable, match="dedicated Inference Endpoint"):
        await make("user/unsupported").generate("a fox")


async def test_an_unknown_model_is_model_not_found(make: Any):
    with pytest.raises(sdclient.ModelNotFound, match="user/nope"):
        await make("user/nope").generate("a fox")


def test_provider_is_for_hub_ids_only():
    with pytest.raises(ValueError, match="applies to Hub model ids"):
        SDClient("http://127.0.0.1:1/models/x", provider="fal-ai")
    with pytest.raises(ValueError, match="provider must be"):
        SDClient("user/model", provider="nobody")  # type: ignore[arg-type]


# -- queues --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "provider"), [("user/flux-lora", "fal-ai"), ("user/wavespeed", "wavespeed")]
)
async def test_a_queued_job_is_polled_with_progress(
    router: FakeRouter, make: Any, clock: FakeClock, model: str, provider: str
):
    router.script(provider, JobScript(queue_s=10.0, run_s=2.0))
    events: list[GenerationEvent] = []
    client = make(model, on_event=events.append)
    start = clock.now
    image = await client.generate("a fox", seed=1)

    interval = client.retry.poll_interval
    assert clock.now - start <= 12.0 + interval + 1e-9
    (job,) = router.jobs
    assert router.job(job)["polls"] <= 12.0 / interval + 2
    kinds = [e.kind for e in events]
    assert kinds[:2] == ["queued", "sending"] and kinds[-1] == "done"
    assert "queued" in kinds[2:] and "generating" in kinds
    if provider == "fal-ai":  # fal-ai tells the queue position, counting down
        positions = [e.position for e in events[2:] if e.kind == "queued"]
        assert positions == sorted(positions, reverse=True) and positions[0] is not None
    assert image.provider == provider


async def test_replicate_waits_then_polls_a_prediction(router: FakeRouter, make: Any, clock: FakeClock):
    router.script("replicate", JobScript(queue_s=1.0, run_s=1.0))
    image = await make("user/replicate-lora").generate("a fox", seed=1)
    posts = [r for r in router.requests if r.method == "POST"]
    assert posts[0].headers["prefer"] == "wait"
    assert posts[0].json["input"]["lora_weights"] == "https://huggingface.co/user/replicate-lora"
    assert image.width == 64


@pytest.mark.parametrize(
    ("model", "provider"),
    [("user/flux-lora", "fal-ai"), ("user/replicate-lora", "replicate"), ("user/wavespeed", "wavespeed")],
)
async def test_a_failed_job_is_job_failed(router: FakeRouter, make: Any, model: str, provider: str):
    router.script(provider, JobScript(queue_s=1.0, fail="CUDA out of memory"))
    with pytest.raises(sdclient.JobFailed, match="CUDA out of memory") as info:
        await make(model).generate("a fox")
    assert info.value.provider == provider


@pytest.mark.parametrize(("model", "provider"), [("user/together", "together"), ("user/nscale", "nscale")])
async def test_a_failing_base64_provider_is_a_server_error(
    router: FakeRouter, make: Any, model: str, provider: str
):
    router.script(provider, *[JobScript(fail="boom")] * 5)
    with pytest.raises(sdclient.ServerError, match="boom"):
        await make(model, max_retries=1).generate("a fox")


@pytest.mark.parametrize(
    ("model", "provider", "cancellable"),
    [
        ("user/flux-lora", "fal-ai", True),
        ("user/replicate-lora", "replicate", True),
        ("user/wavespeed", "wavespeed", False),
    ],
)
async def test_a_job_stuck_in_the_queue_times_out_and_is_cancelled(
    router: FakeRouter, make: Any, clock: FakeClock, model: str, provider: str, cancellable: bool
):
    router.script(provider, JobScript(queue_s=float("inf")))
    with pytest.raises(sdclient.JobTimeout) as info:
        await make(model, max_wait_for_model=5.0).generate("a fox")
    assert isinstance(info.value, TimeoutError) and info.value.provider == provider
    assert clock.now <= 5.0
    (job,) = router.jobs
    assert router.job(job)["cancelled"] is cancellable


@pytest.mark.parametrize(
    ("model", "provider", "cancel"),
    [
        ("user/flux-lora", "fal-ai", ("PUT", "/fal-ai/fal-ai/flux-lora/requests/{id}/cancel")),
        ("user/replicate-lora", "replicate", ("POST", "/replicate/v1/predictions/{id}/cancel")),
    ],
)
@pytest.mark.parametrize("how", ["task cancelled", "caller's timeout"])
async def test_a_caller_who_gives_up_cancels_the_job(
    router: FakeRouter, make: Any, model: str, provider: str, cancel: tuple[str, str], how: str
):
    router.script(provider, JobScript(queue_s=float("inf")))
    client = make(model)

    async def polled_twice() -> None:
        for _ in range(400):
            await asyncio.sleep(0.005)
            if router.jobs and router.job(router.jobs[0])["polls"] >= 2:
                return

    if how == "task cancelled":
        task = asyncio.ensure_future(client.generate("a fox"))
        await polled_twice()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        watcher = asyncio.ensure_future(polled_twice())
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as scope:
                watcher.add_done_callback(lambda _: scope.reschedule(asyncio.get_running_loop().time()))
                await client.generate("a fox")
    (job,) = router.jobs
    assert router.job(job)["cancelled"]
    method, path = cancel
    (sent,) = [r for r in router.requests if r.path.endswith("/cancel")]
    assert (sent.method, sent.path) == (method, path.format(id=job))
    assert sent.authorization == f"Bearer {SENTINEL}"


@pytest.mark.parametrize(
    ("model", "provider"),
    [("user/flux-lora", "fal-ai"), ("user/replicate-lora", "replicate"), ("user/wavespeed", "wavespeed")],
)
async def test_429_mid_poll_is_retried(router: FakeRouter, make: Any, model: str, provider: str):
    router.script(provider, JobScript(queue_s=2.0, poll_429=2))
    events: list[GenerationEvent] = []
    image = await make(model, on_event=events.append).generate("a fox")
    assert image.width == 64
    assert [e.kind for e in events].count("retrying") == 2


@pytest.mark.parametrize(
    ("model", "provider"), [("user/flux-lora", "fal-ai"), ("user/wavespeed", "wavespeed")]
)
async def test_an_image_url_that_404s_is_not_retried(
    router: FakeRouter, make: Any, model: str, provider: str
):
    router.script(provider, JobScript(image_status=404))
    with pytest.raises(sdclient.APIStatusError) as info:
        await make(model).generate("a fox")
    assert info.value.status_code == 404 and "image URL" in str(info.value)
    assert sum(r.host == "images" for r in router.requests) == 1


# -- usage ---------------------------------------------------------------------------------


async def test_usage_is_counted_per_provider(router: FakeRouter, make: Any):
    tracker = sdclient.UsageTracker()
    await make("user/flux-lora", usage=tracker).generate("a fox")
    await make("user/together", usage=tracker).generate("a fox")
    snapshot = tracker.snapshot()
    assert set(snapshot.models) == {"fal-ai:user/flux-lora", "together:user/together"}
    fal = snapshot.models["fal-ai:user/flux-lora"]
    assert fal.images == 1 and fal.requests == 4  # submit, status, result, image


async def test_without_a_reported_compute_time_the_generation_time_is_measured():
    # Real time here: what is measured is the job's run, not its wait in the queue.
    with FakeRouter() as router:
        router.add_model("user/flux-lora", "fal-ai", "fal-ai/flux-lora")
        router.script("fal-ai", JobScript(queue_s=0.3, run_s=0.3))
        fast_polls = dataclasses.replace(FAST, poll_interval=0.05)
        async with SDClient(
            "user/flux-lora", token=SENTINEL, router_url=router.url, hub_url=router.url, retry=fast_polls
        ) as client:
            image = await client.generate("a fox")
    assert image.timings.compute_s is None
    assert 0.2 <= image.timings.request_s <= 0.45
    assert 0.2 <= client.usage.models["fal-ai:user/flux-lora"].compute_seconds <= 0.45


@pytest.mark.parametrize("model", list(MODELS))
async def test_usage_per_provider_counts_requests_images_and_seconds(model: str):
    # Real time: none of the fake's providers reports a compute time, so the measured one counts.
    provider, provider_id, lora = MODELS[model]
    with FakeRouter() as router:
        router.add_model(model, provider, provider_id, lora=lora)
        fast_polls = dataclasses.replace(FAST, poll_interval=0.01)
        async with SDClient(
            model, token=SENTINEL, router_url=router.url, hub_url=router.url, retry=fast_polls
        ) as client:
            image = await client.generate("a fox")
        sent = [r for r in router.requests if not r.path.startswith("/api/")]
    usage = client.usage.models[client.route.usage_key if client.route else model]
    assert usage.images == 1 and usage.requests == len(sent)
    assert usage.prompt_characters == len("a fox")
    assert image.timings.compute_s is None
    assert usage.compute_seconds == pytest.approx(image.timings.request_s) and usage.compute_seconds > 0
