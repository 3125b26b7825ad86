"""The proxy in front of Inference Providers (the fake router): `SDPROXY_PROVIDER`, the provider's
queue in the stream, its failures as the proxy's errors."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from typing import Any

import huggingface_hub.constants
import pytest
from PIL import Image
from proxy_harness import SENTINEL, RunningProxy
from test_stream import names, parse_sse

from proxy import ConfigError, load_settings
from sdclient.testing import FakeRouter, JobScript

LORA = "user/flux-lora"
# One model per kind of provider: a queue (fal-ai), predictions (Replicate), base64 (Together), the
# image itself (hf-inference); and the path of the request each one must receive.
ROUTES = [
    ("user/sdxl-lora", "fal-ai", "fal-ai/lora", "pytorch_lora_weights.safetensors"),
    ("user/replicate-lora", "replicate", "owner/flux-dev-lora", "lora.safetensors"),
    ("user/together", "together", "black-forest-labs/FLUX.1-dev", None),
    ("user/warm-sd", "hf-inference", None, None),
]
PATHS = {
    "fal-ai": "/fal-ai/fal-ai/lora",
    "replicate": "/replicate/v1/models/owner/flux-dev-lora/predictions",
    "together": "/together/v1/images/generations",
    "hf-inference": "/hf-inference/models/user/warm-sd",
}


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRouter]:
    # The tests run with HF_HUB_OFFLINE=1; this fake Hub is on 127.0.0.1.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with FakeRouter() as router:
        router.add_model(LORA, "fal-ai", "fal-ai/flux-lora", lora="lora.safetensors")
        router.add_model("user/sdxl-b64", "nscale", "stabilityai/stable-diffusion-xl-base-1.0")
        for model, provider, provider_id, lora in ROUTES:
            router.add_model(model, provider, provider_id, lora=lora)
        yield router


@pytest.fixture
def start(start_proxy: Callable[..., RunningProxy], router: FakeRouter) -> Callable[..., RunningProxy]:
    def start(model: str = LORA, **overrides: Any) -> RunningProxy:
        return start_proxy(model=model, router_url=router.url, hub_url=router.url, **overrides)

    return start


def test_a_lora_on_fal_ai_streams_the_providers_queue(start: Callable[..., RunningProxy], router: FakeRouter):
    router.script("fal-ai", JobScript(queue_s=1.6, run_s=1.0))
    proxy = start(max_wait_for_model=20)
    with proxy.client() as client:
        response = client.post("/generate/stream", json={"prompt": "abraza man, portrait", "seed": 5})
    assert response.status_code == 200
    events = parse_sse(response.text)
    assert names(events)[-2:] == ["generating", "image"]
    # First the proxy's own slot (free: 0), then the provider's queue: 1-based place in line.
    queued = [data["position"] for name, data in events if name == "queued"]
    assert queued[0] == 0 and 2 in queued[1:] and queued[-1] == 1
    image = Image.open(io.BytesIO(base64.b64decode(events[-1][1]["image"])))
    assert image.format == "PNG"

    submitted = [r for r in router.requests if r.method == "POST" and r.path.startswith("/fal-ai/")]
    assert len(submitted) == 1
    assert submitted[0].json["loras"][0]["path"].endswith(f"/{LORA}/resolve/main/lora.safetensors")
    assert submitted[0].authorization == f"Bearer {SENTINEL}"


@pytest.mark.parametrize(("model", "provider"), [(m, p) for m, p, _, _ in ROUTES])
def test_every_kind_of_provider_through_the_proxy(
    start: Callable[..., RunningProxy], router: FakeRouter, model: str, provider: str
):
    proxy = start(model)  # SDPROXY_PROVIDER=auto: the Hub's mapping says who serves it
    with proxy.client() as client:
        response = client.post(
            "/generate", json={"prompt": "a lighthouse", "seed": 4, "width": 256, "height": 256}
        )
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (256, 256)
    posts = [r for r in router.requests if r.method == "POST"]
    assert posts[0].path.split("?")[0] == PATHS[provider]
    assert posts[0].authorization == f"Bearer {SENTINEL}"


def test_generate_through_a_base64_provider_named_by_setting(
    start: Callable[..., RunningProxy], router: FakeRouter
):
    proxy = start("user/sdxl-b64", provider="nscale")
    with proxy.client() as client:
        response = client.post("/generate", json={"prompt": "a lighthouse", "seed": 1})
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).format == "PNG"
    assert [r.path for r in router.requests if r.method == "POST"] == ["/nscale/v1/images/generations"]


def test_a_provider_that_does_not_serve_the_model_is_a_clear_error(start: Callable[..., RunningProxy]):
    proxy = start(provider="replicate")
    with proxy.client() as client:
        response = client.post("/generate", json={"prompt": "a fox"})
    assert response.status_code >= 400
    message = response.json()["error"]["message"]
    assert "replicate" in message and "fal-ai" in message


def test_a_failed_provider_job_is_the_proxys_error(start: Callable[..., RunningProxy], router: FakeRouter):
    router.script("fal-ai", JobScript(fail="NSFW content detected"))
    proxy = start()
    with proxy.client() as client:
        response = client.post("/generate", json={"prompt": "a fox", "seed": 2})
    assert response.status_code == 502
    error = response.json()["error"]
    assert "NSFW content detected" in error["message"]


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (
            {"model": "http://127.0.0.1:1/m", "provider": "fal-ai"},
            "SDPROXY_PROVIDER=fal-ai applies to Hub ids",
        ),
        (
            {"model": "user/m", "provider": "fal-ai", "base_url": "http://127.0.0.1:1"},
            "cannot be used with SDPROXY_PROVIDER=fal-ai",
        ),
        ({"model": "user/m", "provider": "nobody"}, "SDPROXY_PROVIDER"),
    ],
)
def test_provider_settings_that_cannot_work_are_refused(overrides: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_settings(upstream_token=SENTINEL, **overrides)
