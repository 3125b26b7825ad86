"""What SDClient sends and returns: the exact request of the spec, URLs, tokens, batches."""

from __future__ import annotations

import asyncio
import time

import httpx
import huggingface_hub
import pytest
import respx
from client_harness import FAST, MODEL_ID, SENTINEL, MakeClient

import sdclient
from sdclient import GenerateRequest, SDClient
from sdclient.testing import InferenceTestServer, Reply

# -- the request on the wire (real server) -------------------------------------------------


async def test_request_is_exactly_the_protocol(server: InferenceTestServer, make_client: MakeClient):
    client = make_client()

    image = await client.generate(
        "portrait of abraza man",
        negative_prompt="blurry",
        width=128,
        height=96,
        num_inference_steps=30,
        guidance_scale=7.5,
        seed=1234,
        scheduler="EulerDiscreteScheduler",
    )

    (request,) = server.requests
    assert request.method == "POST"
    assert request.path == f"/models/{MODEL_ID}"
    assert request.json == {
        "inputs": "portrait of abraza man",
        "parameters": {
            "negative_prompt": "blurry",
            "width": 128,
            "height": 96,
            "num_inference_steps": 30,
            "guidance_scale": 7.5,
            "seed": 1234,
            "scheduler": "EulerDiscreteScheduler",
        },
    }
    assert request.headers["accept"] == "image/png"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"] == f"sdclient/{sdclient.__version__}"
    assert "authorization" not in request.headers  # no token anywhere
    assert "x-use-cache" not in request.headers
    assert (image.width, image.height) == (128, 96)
    assert image.seed == 1234
    assert image.request.negative_prompt == "blurry"


async def test_unset_parameters_are_omitted_and_a_seed_is_always_sent(
    server: InferenceTestServer, make_client: MakeClient
):
    image = await make_client().generate("a fox")

    (request,) = server.requests
    assert set(request.json) == {"inputs", "parameters"}
    assert set(request.parameters) == {"seed"}  # drawn by the client, so the image records it
    assert image.seed == request.parameters["seed"]
    assert image.request.width is None


async def test_use_cache_false_sends_the_header(server: InferenceTestServer, make_client: MakeClient):
    client = make_client()
    await client.generate("a fox", use_cache=False)
    await client.generate("a fox", use_cache=True)
    assert server.requests[0].headers["x-use-cache"] == "false"
    assert "x-use-cache" not in server.requests[1].headers


async def test_extra_headers_and_parameters(server: InferenceTestServer, make_client: MakeClient):
    client = make_client(headers={"X-HF-Bill-To": "my-org"})
    await client.generate("a fox", extra_parameters={"clip_skip": 2})
    (request,) = server.requests
    assert request.headers["x-hf-bill-to"] == "my-org"
    assert request.parameters["clip_skip"] == 2


@pytest.mark.parametrize("format", ["jpeg", "png", "webp"])
async def test_format_comes_from_the_bytes_not_the_header(
    server: InferenceTestServer, make_client: MakeClient, format: str
):
    # The header lies (always image/png): the client reads the format from the bytes.
    server.default = Reply.image(format=format, headers={"content-type": "image/png"})
    image = await make_client().generate("a fox", width=80, height=48)
    assert image.format == format
    assert image.content_type == f"image/{format}"
    assert (image.width, image.height) == (80, 48)
    assert image.to_pil().size == (80, 48)


async def test_response_headers_are_kept(server: InferenceTestServer, make_client: MakeClient):
    server.default = Reply.image(compute_time=1.25, headers={"x-compute-type": "1-t4"})
    image = await make_client().generate("a fox")
    (request,) = server.requests
    assert image.timings.compute_s == 1.25
    assert image.compute_type == "1-t4"
    assert image.request_id == request.request_id
    assert image.model_sha is not None and len(image.model_sha) == 40
    assert image.timings.cold_start_wait_s == 0.0
    assert 0 < image.timings.total_s < 1
    assert image.attempts == 1


# -- model ids, URLs and validation --------------------------------------------------------


async def test_hub_id_with_base_url(server: InferenceTestServer, make_client: MakeClient):
    client = make_client(MODEL_ID, base_url=server.url + "/")
    assert client.url == server.model_url(MODEL_ID)
    await client.generate("a fox")
    assert server.requests[0].path == f"/models/{MODEL_ID}"


def test_hub_id_on_hf_inference_goes_to_the_router():
    client = SDClient("user/sd-raza", provider="hf-inference")
    assert client.url == "https://router.huggingface.co/hf-inference/models/user/sd-raza"
    assert client.route == sdclient.Route(
        provider="hf-inference", model="user/sd-raza", provider_model="user/sd-raza", url=client.url
    )
    assert sdclient.DEFAULT_BASE_URL == "https://router.huggingface.co/hf-inference"


def test_hub_id_with_auto_asks_the_hub_before_the_first_call():
    client = SDClient("user/sd-raza")
    assert client.provider == "auto"
    assert client.route is None and client.url is None


@pytest.mark.parametrize(
    ("model", "base_url", "message"),
    [
        ("not a model id", None, "Hub model id like 'user/sd-model'"),
        ("ftp://host/model", None, "http:// or https://"),
        ("http://127.0.0.1:1/models/x", "http://other", "not both"),
        ("user/model", "router.huggingface.co", "base_url must start with http"),
    ],
)
def test_bad_model_or_base_url(model: str, base_url: str | None, message: str):
    with pytest.raises(ValueError, match=message):
        SDClient(model, base_url=base_url)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"max_wait_for_model": 0}, "max_wait_for_model"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_bad_limits(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        SDClient("user/model", **kwargs)


async def test_bad_parameters_are_refused_before_sending(
    server: InferenceTestServer, make_client: MakeClient
):
    client = make_client()
    with pytest.raises(ValueError, match="width"):
        await client.generate("a fox", width=-1)
    with pytest.raises(ValueError, match="prompt"):
        await client.generate("")
    assert server.requests == []


# -- tokens --------------------------------------------------------------------------------


async def test_explicit_token_is_sent_to_any_url(server: InferenceTestServer, make_client: MakeClient):
    await make_client(token=SENTINEL).generate("a fox")
    assert server.requests[0].headers["authorization"] == f"Bearer {SENTINEL}"


async def test_discovered_token_is_not_sent_to_other_hosts(
    server: InferenceTestServer, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: SENTINEL)
    await make_client().generate("a fox")
    assert "authorization" not in server.requests[0].headers


@pytest.mark.parametrize(
    "url",
    [
        "https://router.huggingface.co/hf-inference/models/user/m",
        "https://xyz123.us-east-1.aws.endpoints.huggingface.cloud",
        "https://huggingface.co/api/x",
    ],
)
@respx.mock
async def test_hf_token_env_is_sent_to_hugging_face_hosts(
    url: str, monkeypatch: pytest.MonkeyPatch, tiny_png: bytes
):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    route = respx.post(url).mock(return_value=httpx.Response(200, content=tiny_png))
    async with SDClient(url) as client:
        await client.generate("a fox")
    assert route.calls.last.request.headers["authorization"] == f"Bearer {SENTINEL}"


@respx.mock
async def test_login_token_is_used_when_no_env(monkeypatch: pytest.MonkeyPatch, tiny_png: bytes):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_from_login_file")
    route = respx.post("https://router.huggingface.co/hf-inference/models/u/m").mock(
        return_value=httpx.Response(200, content=tiny_png)
    )
    async with SDClient("u/m", provider="hf-inference") as client:
        await client.generate("a fox")
    assert route.calls.last.request.headers["authorization"] == "Bearer hf_from_login_file"


@respx.mock
async def test_argument_beats_env_beats_login(monkeypatch: pytest.MonkeyPatch, tiny_png: bytes):
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_login")
    route = respx.post("https://router.huggingface.co/hf-inference/models/u/m").mock(
        return_value=httpx.Response(200, content=tiny_png)
    )
    async with SDClient("u/m", provider="hf-inference", token="hf_arg") as client:
        await client.generate("a fox")
    async with SDClient("u/m", provider="hf-inference") as client:
        await client.generate("a fox")
    assert [c.request.headers["authorization"] for c in route.calls] == ["Bearer hf_arg", "Bearer hf_env"]


def test_token_with_a_line_break_is_refused_without_echoing_it():
    with pytest.raises(ValueError) as info:
        SDClient("user/model", token=SENTINEL + "\nX-Evil: 1")
    assert "line break" in str(info.value)
    assert SENTINEL not in str(info.value)


# -- http_client, lifecycle ----------------------------------------------------------------


async def test_injected_http_client_is_used_and_not_closed(server: InferenceTestServer):
    async with httpx.AsyncClient(headers={"X-Injected": "yes"}) as http:
        async with SDClient(server.model_url(MODEL_ID), http_client=http, retry=FAST) as client:
            await client.generate("a fox")
        assert not http.is_closed
    assert server.requests[0].headers["x-injected"] == "yes"
    assert server.requests[0].headers["user-agent"].startswith("sdclient/")


async def test_connections_are_pooled(server: InferenceTestServer, make_client: MakeClient):
    client = make_client()
    for _ in range(5):
        await client.generate("a fox")
    assert server.connections_opened == 1


async def test_closed_client_refuses(make_client: MakeClient):
    client = make_client()
    await client.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await client.generate("a fox")


# -- batches and concurrency ---------------------------------------------------------------


async def test_generate_many_keeps_the_input_order(server: InferenceTestServer, make_client: MakeClient):
    client = make_client()
    items = ["a", GenerateRequest(prompt="b", seed=7, width=72), "c", "d", "e"]

    images = await client.generate_many(items, concurrency=3)

    assert [image.request.prompt for image in images] == ["a", "b", "c", "d", "e"]
    assert images[1].seed == 7 and images[1].width == 72
    assert len(server.requests) == 5


async def test_generate_many_return_exceptions(server: InferenceTestServer, make_client: MakeClient):
    server.enqueue(Reply.image(), Reply.error(400, "bad prompt"), Reply.image())
    client = make_client()

    results = await client.generate_many(["a", "b", "c"], concurrency=1, return_exceptions=True)

    assert isinstance(results[0], sdclient.GeneratedImage)
    assert isinstance(results[1], sdclient.InvalidRequest)
    assert isinstance(results[2], sdclient.GeneratedImage)


async def test_generate_many_raises_the_first_failure(server: InferenceTestServer, make_client: MakeClient):
    server.default = Reply.error(404, "Model user/sd-model does not exist")
    with pytest.raises(sdclient.ModelNotFound):
        await make_client().generate_many(["a", "b", "c"])


async def test_max_concurrency_bounds_requests_in_flight(
    server: InferenceTestServer, make_client: MakeClient
):
    server.default = Reply.image(delay=0.15)
    events: list[sdclient.GenerationEvent] = []
    client = make_client(max_concurrency=2, on_event=events.append)

    start = time.monotonic()
    await asyncio.gather(*(client.generate(str(i)) for i in range(6)))
    elapsed = time.monotonic() - start

    assert elapsed >= 3 * 0.15  # 6 calls, 2 at a time
    arrivals = sorted(r.received_at for r in server.requests)
    assert arrivals[2] - arrivals[0] >= 0.14  # the third waited for a slot
    assert [e.kind for e in events].count("queued") == 6


async def test_on_event_hook_errors_do_not_break_the_call(
    server: InferenceTestServer, make_client: MakeClient
):
    def broken(event: sdclient.GenerationEvent) -> None:
        raise RuntimeError("hook bug")

    image = await make_client(on_event=broken).generate("a fox")
    assert image.attempts == 1
