"""Conformance: SDClient sends what huggingface_hub's own client sends, provider by provider.

huggingface_hub's ``AsyncInferenceClient`` (its router base, Hub endpoint and LoRA URL template
pointed at the fake with ``FakeRouter.patch_huggingface_hub``) and ``SDClient`` call the same
``FakeRouter``; every request the fake receives is recorded, and the provider requests of the two
clients must match in method, route, JSON body and ``Authorization`` header (and ``Prefer`` and
``Content-Type``). huggingface_hub is the reference. Where SDClient differs on purpose, the
difference is written out below (:func:`_expected_from_reference`) and asserted as such, so any
other change in a route or a body field fails the comparison (see the tests at the end).

Not compared: the Hub's mapping request (huggingface_hub sends its ambient login there, SDClient
the token it was given, so a private model's mapping can be read), ``User-Agent`` and ``Accept``
(huggingface_hub asks every provider for ``image/png``, JSON APIs included; SDClient asks JSON
APIs for ``application/json``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from client_harness import FAST, SENTINEL
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.inference._providers import _common, hf_inference
from PIL import Image
from typer.testing import CliRunner

import sdclient
from sdclient import SDClient, SyncSDClient
from sdclient._cli import app
from sdclient._providers import PROVIDERS
from sdclient.testing import FakeRouter, RoutedRequest

PROMPT = "portrait of abraza man as a peaky blinders character"
PARAMETERS: dict[str, Any] = {
    "negative_prompt": "blurry, low quality",
    "width": 768,
    "height": 512,
    "num_inference_steps": 28,
    "guidance_scale": 3.5,
    "seed": 1234,
}

# case: (Hub model id, provider, the provider's model id, LoRA weights file)
CASES: dict[str, tuple[str, str, str, str | None]] = {
    "hf-inference": ("user/sd-hf", "hf-inference", "user/sd-hf", None),
    "fal-ai": ("user/fal-flux", "fal-ai", "fal-ai/flux/dev", None),
    "fal-ai-flux-lora": ("user/flux-lora", "fal-ai", "fal-ai/flux-lora", "lora.safetensors"),
    "fal-ai-sdxl-lora": ("user/sdxl-lora", "fal-ai", "fal-ai/lora", "pytorch_lora_weights.safetensors"),
    "replicate": ("user/replicate", "replicate", "black-forest-labs/flux-dev", None),
    "replicate-version": ("user/replicate-v", "replicate", "owner/sd:5c7d5dc6dd8bf75c1acaa8565735e7", None),
    "replicate-lora": ("user/replicate-lora", "replicate", "owner/flux-dev-lora", "lora.safetensors"),
    "wavespeed": ("user/wavespeed", "wavespeed", "wavespeed-ai/flux-dev-lora", "lora.safetensors"),
    "together": ("user/together", "together", "black-forest-labs/FLUX.1-dev", None),
    "nscale": ("user/nscale", "nscale", "stabilityai/stable-diffusion-xl-base-1.0", None),
}

_COMPARED_HEADERS = ("authorization", "content-type", "prefer")


@pytest.fixture
def router() -> Iterator[FakeRouter]:
    with FakeRouter() as router:
        for model, provider, provider_id, lora in CASES.values():
            router.add_model(model, provider, provider_id, lora=lora)  # type: ignore[arg-type]
        yield router


@pytest.fixture(autouse=True)
def _fake_hub_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where the tests run with HF_HUB_OFFLINE=1, huggingface_hub refuses every request; the fake
    # Hub and router here are on 127.0.0.1.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(autouse=True)
def _fresh_huggingface_hub_caches() -> Iterator[None]:
    """huggingface_hub caches mappings and task checks per model id, across fakes on other ports."""
    _common._fetch_inference_provider_mapping.cache_clear()
    hf_inference._check_supported_task.cache_clear()
    yield
    _common._fetch_inference_provider_mapping.cache_clear()
    hf_inference._check_supported_task.cache_clear()


def _provider_requests(router: FakeRouter) -> list[RoutedRequest]:
    """What reached the router and the providers, without the Hub's API (`/api/models/...`, and
    what else huggingface_hub asks the Hub); `/api/v3/` is WaveSpeed's off-router form."""
    return [
        r
        for r in router.requests
        if r.host == "router" and (not r.path.startswith("/api/") or r.path.startswith("/api/v3/"))
    ]


def _canonical(body: Any) -> str:
    """JSON with sorted keys: ``7`` and ``7.0`` or ``"7"`` stay different."""
    return json.dumps(body, sort_keys=True)


def _ids_out(router: FakeRouter, path: str) -> str:
    for job in router.jobs:
        path = path.replace(job, "{id}")
    return path


def _summary(router: FakeRouter, request: RoutedRequest) -> dict[str, Any]:
    return {
        "method": request.method,
        "path": _ids_out(router, request.path),
        "query": request.query,
        "json": _canonical(request.json),
        **{name: request.headers.get(name) for name in _COMPARED_HEADERS},
    }


async def _reference(router: FakeRouter, case: str) -> tuple[list[dict[str, Any]], tuple[int, int]]:
    """huggingface_hub's requests (submit first, then the distinct follow-ups) and image size."""
    model, provider, _, _ = CASES[case]
    router.clear_requests()
    with router.patch_huggingface_hub():
        async with AsyncInferenceClient(provider=provider, api_key=SENTINEL) as client:  # type: ignore[arg-type]
            image = await client.text_to_image(PROMPT, model=model, **PARAMETERS)
    return _requests(router), image.size


async def _ours(router: FakeRouter, case: str) -> tuple[list[dict[str, Any]], tuple[int, int]]:
    model, provider, _, _ = CASES[case]
    router.clear_requests()
    async with SDClient(
        model,
        provider=provider,
        token=SENTINEL,
        router_url=router.url,
        hub_url=router.url,
        retry=FAST,  # type: ignore[arg-type]
    ) as client:
        image = await client.generate(PROMPT, **PARAMETERS)
    return _requests(router), (image.width, image.height)


def _requests(router: FakeRouter) -> list[dict[str, Any]]:
    seen = [_summary(router, r) for r in _provider_requests(router)]
    assert seen, "no request reached the provider"
    submit, follow_ups = seen[0], seen[1:]
    distinct = []  # polls repeat as often as the polling interval makes them: compare the routes
    for request in follow_ups:
        if request not in distinct:
            distinct.append(request)
    return [submit, *distinct]


def _expected_from_reference(
    router: FakeRouter, case: str, reference: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """huggingface_hub's requests, changed where SDClient differs on purpose (each one explained)."""
    _, provider, provider_id, _ = CASES[case]
    expected = [dict(request) for request in reference]
    if provider == "fal-ai":
        # huggingface_hub sends fal-ai text-to-image to the synchronous route (one request held
        # open for the whole wait). SDClient submits the same body to fal-ai's queue, as
        # huggingface_hub itself does for fal-ai's video and image-to-image tasks: the queue
        # reports the position, is polled within the caller's deadline and can be cancelled.
        # Same path, body and token; the queue adds the status poll and the result request.
        submit = expected[0]
        assert submit["query"] == ""
        submit["query"] = "_subdomain=queue"
        base = {**submit, "method": "GET", "json": _canonical(None), "content-type": None}
        expected[1:1] = [
            {**base, "path": f"/fal-ai/{provider_id}/requests/{{id}}/status"},
            {**base, "path": f"/fal-ai/{provider_id}/requests/{{id}}"},
        ]
    for request in expected[1:]:
        if request["method"] == "GET":
            # huggingface_hub polls with the submit's headers, `Content-Type` included; a GET
            # without a body has none from SDClient.
            request["content-type"] = None
    if provider == "wavespeed":
        # huggingface_hub adds the `/wavespeed` prefix to the result URL only when the router's
        # host is `router.huggingface.co`; on the fake it asks the off-router form
        # `/api/v3/...`. SDClient always asks through the router it was given.
        for request in expected[1:]:
            request["path"] = "/wavespeed" + request["path"]
    return expected


@pytest.mark.parametrize("case", list(CASES))
async def test_sdclient_sends_what_huggingface_hub_sends(router: FakeRouter, case: str):
    reference, reference_size = await _reference(router, case)
    ours, size = await _ours(router, case)

    assert ours == _expected_from_reference(router, case, reference)
    assert size == reference_size == (PARAMETERS["width"], PARAMETERS["height"])
    assert ours[0]["authorization"] == f"Bearer {SENTINEL}"
    # Provider image hosts never get the token, from either client.
    assert all(r.authorization is None for r in router.requests if r.host == "images")


def test_the_cases_cover_every_provider_and_lora_shape():
    assert {provider for _, provider, _, _ in CASES.values()} == set(PROVIDERS)
    loras = {(provider, provider_id) for _, provider, provider_id, lora in CASES.values() if lora}
    assert {
        ("fal-ai", "fal-ai/lora"),
        ("fal-ai", "fal-ai/flux-lora"),
        ("replicate", "owner/flux-dev-lora"),
    } <= loras


async def test_the_lora_bodies_carry_the_adapter(router: FakeRouter):
    """What the comparison covers for LoRAs, spelled out once."""
    sdxl, _ = await _ours(router, "fal-ai-sdxl-lora")
    body = json.loads(sdxl[0]["json"])
    assert body["loras"] == [
        {"path": f"{router.url}/user/sdxl-lora/resolve/main/pytorch_lora_weights.safetensors", "scale": 1}
    ]
    assert body["model_name"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert body["image_size"] == {"width": 768, "height": 512}
    replicate, _ = await _ours(router, "replicate-lora")
    assert (
        json.loads(replicate[0]["json"])["input"]["lora_weights"]
        == "https://huggingface.co/user/replicate-lora"
    )


# -- the comparison can fail ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "change"),
    [
        ("together", "rename steps"),
        ("fal-ai-sdxl-lora", "lora scale"),
        ("replicate-lora", "drop lora"),
        ("nscale", "route"),
        ("hf-inference", "seed as text"),
    ],
)
async def test_a_deliberate_change_in_our_request_fails_the_comparison(
    router: FakeRouter, monkeypatch: pytest.MonkeyPatch, case: str, change: str
):
    _, provider, _, _ = CASES[case]
    adapter = PROVIDERS[provider]
    payload = adapter.payload

    def changed_payload(*args: Any) -> dict[str, Any]:
        body = payload(*args)
        if change == "rename steps":
            body["num_inference_steps"] = body.pop("steps")
        elif change == "lora scale":
            body["loras"][0]["scale"] = 0.8
        elif change == "drop lora":
            del body["input"]["lora_weights"]
        elif change == "seed as text":
            body["parameters"]["seed"] = str(body["parameters"]["seed"])
        return body

    monkeypatch.setattr(adapter, "payload", changed_payload)
    if change == "route":
        monkeypatch.setattr(adapter, "route", lambda provider_model: "/v1/images/generate")
    reference, _ = await _reference(router, case)
    if change == "route":  # the fake refuses the changed route; what it received still differs
        with pytest.raises(sdclient.APIStatusError):
            await _ours(router, case)
        ours = _requests(router)
    else:  # the fake accepts the changed body: only the comparison catches it
        ours, _ = await _ours(router, case)
    with pytest.raises(AssertionError):
        assert ours == _expected_from_reference(router, case, reference)


def test_the_auth_header_is_compared(router: FakeRouter):
    request = RoutedRequest("POST", "/x", "", {"authorization": "Bearer a"}, {}, "router")
    other = RoutedRequest("POST", "/x", "", {"authorization": "Bearer b"}, {}, "router")
    assert _summary(router, request) != _summary(router, other)


# -- the sync facade and the CLI through the fake router ----------------------------------

# One route of each kind: fal-ai's queue (a FLUX LoRA), Replicate (a LoRA), a base64 provider,
# hf-inference.
SURFACE_CASES = ["fal-ai-flux-lora", "replicate-lora", "together", "hf-inference"]


@pytest.mark.parametrize("case", SURFACE_CASES)
def test_the_sync_client_sends_what_sdclient_sends(router: FakeRouter, case: str):
    model, provider, _, _ = CASES[case]
    expected, _ = asyncio.run(_ours(router, case))  # SDClient's, compared with huggingface_hub's above
    router.clear_requests()
    with SyncSDClient(
        model, provider=provider, token=SENTINEL, router_url=router.url, hub_url=router.url, retry=FAST
    ) as client:  # type: ignore[arg-type]
        image = client.generate(PROMPT, **PARAMETERS)
    assert (image.width, image.height) == (768, 512) and image.provider == provider
    assert _requests(router) == expected


@pytest.mark.parametrize("case", SURFACE_CASES)
def test_the_cli_sends_what_sdclient_sends(router: FakeRouter, tmp_path: Path, case: str):
    model, provider, _, _ = CASES[case]
    expected, _ = asyncio.run(_ours(router, case))
    router.clear_requests()
    result = CliRunner().invoke(
        app,
        [
            "generate",
            PROMPT,
            "-m",
            model,
            "--provider",
            provider,
            "--router-url",
            router.url,
            "--hub-url",
            router.url,
            "--token-env",
            "CONFORMANCE_TOKEN",
            "--width",
            "768",
            "--height",
            "512",
            "--steps",
            "28",
            "--guidance",
            "3.5",
            "--seed",
            "1234",
            "--negative-prompt",
            "blurry, low quality",
            "-o",
            str(tmp_path),
            "--no-usage",
            "-q",
        ],  # fmt: skip
        env={"CONFORMANCE_TOKEN": SENTINEL},
    )
    assert result.exit_code == 0, result.output
    (png,) = tmp_path.glob("*.png")
    assert re.search(r"-1234\.png$", png.name)
    with Image.open(png) as saved:
        assert saved.size == (768, 512)
    assert _requests(router) == expected


def test_the_cli_refuses_an_unknown_provider():
    result = CliRunner().invoke(app, ["generate", "a fox", "-m", "user/x", "--provider", "nobody"])
    assert result.exit_code == 2
