"""`POST /v1/images/generations` through the real `openai` Python package: images as base64 and as
URLs, the proxy's extras through `extra_body`, and OpenAI's typed errors."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import httpx
import openai
import pytest
from PIL import Image
from proxy_harness import RunningProxy

from sdclient.testing import InferenceTestServer

KEY = "client-key-0123456789abcdef"


def _client(proxy: RunningProxy, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=20)


def test_images_generate_returns_n_images_as_base64_with_the_extras(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy(api_keys=[KEY])
    with _client(proxy) as client:
        result = client.images.generate(
            model="stable-diffusion",
            prompt="a watercolor fox",
            n=2,
            size="512x512",
            response_format="b64_json",
            extra_body={"seed": 42, "negative_prompt": "blurry", "num_inference_steps": 12},
        )
    assert len(result.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json or ""))) for item in result.data]
    assert [image.size for image in images] == [(512, 512)] * 2
    sent = sorted((r for r in upstream.requests if r.method == "POST"), key=lambda r: r.parameters["seed"])
    assert [r.parameters["seed"] for r in sent] == [42, 43]  # one seed per image
    for request in sent:
        assert request.parameters["negative_prompt"] == "blurry"
        assert request.parameters["num_inference_steps"] == 12
        assert (request.parameters["width"], request.parameters["height"]) == (512, 512)


def test_images_generate_with_url_format_gives_urls_the_same_key_can_fetch(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy(api_keys=[KEY])
    with _client(proxy) as client:
        result = client.images.generate(prompt="a lighthouse", n=2, size="256x256", response_format="url")
    urls = [item.url or "" for item in result.data]
    assert len(set(urls)) == 2 and all(url.startswith(proxy.url + "/v1/images/img_") for url in urls)
    mine = httpx.get(urls[0], headers={"Authorization": f"Bearer {KEY}"})
    anonymous = httpx.get(urls[0])
    assert mine.status_code == 200 and Image.open(io.BytesIO(mine.content)).size == (256, 256)
    assert anonymous.status_code == 401


def test_errors_are_openai_typed_errors(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy(api_keys=[KEY], rate_limit_per_minute=0.01, rate_limit_burst=1)
    with _client(proxy) as client:
        with pytest.raises(openai.BadRequestError) as bad_size:
            client.images.generate(prompt="a fox", size="512 by 512")
        with pytest.raises(openai.BadRequestError) as too_many:
            client.images.generate(prompt="a fox", n=9)
        client.images.generate(prompt="a fox", size="64x64")  # the one request of the burst
        with pytest.raises(openai.RateLimitError) as limited:
            client.images.generate(prompt="a fox", size="64x64")
    with _client(proxy, key="not-a-key-0123456789abcdef") as stranger:
        with pytest.raises(openai.AuthenticationError) as unauthorized:
            stranger.images.generate(prompt="a fox")
    assert bad_size.value.status_code == 400
    assert bad_size.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert bad_size.value.body["param"] == "size"  # type: ignore[index]
    assert "WIDTHxHEIGHT" in bad_size.value.body["message"]  # type: ignore[index]
    assert too_many.value.body["param"] == "n"  # type: ignore[index]
    assert limited.value.status_code == 429 and limited.value.code == "rate_limited"
    assert limited.value.response.headers["retry-after"]
    assert unauthorized.value.status_code == 401 and unauthorized.value.code == "unauthorized"
    assert len([r for r in upstream.requests if r.method == "POST"]) == 1


def test_a_size_the_proxy_does_not_allow_is_a_bad_request(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy()
    with _client(proxy) as client, pytest.raises(openai.BadRequestError) as too_big:
        client.images.generate(prompt="a fox", size="2048x2048")
    assert too_big.value.body["param"] == "width"  # type: ignore[index]
    assert not upstream.requests
