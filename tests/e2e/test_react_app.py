"""The React page in a real browser, against the real proxy and a scripted model server.

Each test starts the proxy (serving examples/react-app/dist at /app/) in front of an
`InferenceTestServer`, opens the page in Chromium and uses it as a person would.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from browser_harness import SENTINEL, Stack, missing_prerequisite
from PIL import Image
from playwright.sync_api import Page, Request, Response, expect

from sdclient.testing import Reply

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(missing_prerequisite() is not None, reason=missing_prerequisite() or ""),
]

TIMEOUT_MS = 15_000


@dataclass
class Traffic:
    """Every request the page sent and every response it received."""

    requests: list[Request] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)

    def to_path(self, path: str) -> list[Response]:
        return [r for r in self.responses if r.url.split("?")[0].endswith(path)]


@pytest.fixture
def traffic(page: Page) -> Traffic:
    recorded = Traffic()
    page.on("request", lambda request: recorded.requests.append(request))
    page.on("response", lambda response: recorded.responses.append(response))
    return recorded


@pytest.fixture
def open_page(page: Page, traffic: Traffic) -> Iterator[Callable[[Stack], Page]]:
    """`open_page(stack)`: the page loaded from the proxy, with short timeouts."""
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def open_(stack: Stack) -> Page:
        page.goto(stack.app_url)
        expect(page.get_by_role("heading", name="Stable Diffusion studio")).to_be_visible()
        return page

    yield open_
    assert errors == [], f"uncaught errors in the page: {errors}"


def fill_form(page: Page, prompt: str, *, seed: int | None = None, size: int = 256) -> None:
    page.get_by_test_id("prompt").fill(prompt)
    page.get_by_label("Width").select_option(str(size))
    page.get_by_label("Height").select_option(str(size))
    if seed is not None:
        page.get_by_test_id("random-seed").uncheck()
        page.get_by_test_id("seed").fill(str(seed))


def natural_width(page: Page, index: int = 0) -> int:
    return int(page.get_by_test_id("gallery-image").nth(index).evaluate("img => img.naturalWidth"))


def wait_for_image(page: Page, count: int = 1) -> None:
    """Wait until `count` images are in the gallery and the newest one has decoded."""
    expect(page.get_by_test_id("gallery-image")).to_have_count(count)
    page.wait_for_function(
        "() => { const img = document.querySelector('[data-testid=gallery-image]');"
        " return img && img.complete && img.naturalWidth > 0; }"
    )


def test_prompt_to_image_with_seed_timings_and_download(
    stack: Stack, open_page: Callable[[Stack], Page], tmp_path: Path
) -> None:
    stack.upstream.default = Reply.image(format="png", compute_time=0.12, delay=0.6)
    page = open_page(stack)
    generate = page.get_by_test_id("generate")
    expect(page.get_by_test_id("gallery-empty")).to_be_visible()

    fill_form(page, "Portrait of Ábraza man, peaky blinders", seed=1234)
    page.get_by_label("Negative prompt").fill("blurry")
    generate.click()

    # While the request runs: the button is disabled and the progress is announced.
    expect(generate).to_be_disabled()
    expect(page.locator("form")).to_have_attribute("aria-busy", "true")
    status = page.get_by_role("status")
    expect(status).to_be_visible()
    expect(status).to_have_text(re.compile(r"Sending|Starting|Queued|Generating"))

    wait_for_image(page)
    expect(generate).to_be_enabled()
    expect(status).to_be_hidden()
    assert natural_width(page) == 256
    expect(page.get_by_test_id("gallery-seed")).to_have_text("1234")
    expect(page.get_by_test_id("gallery-timings")).to_contain_text("compute")
    link = page.get_by_test_id("download-link")
    expect(link).to_have_attribute("download", "portrait-of-abraza-man-peaky-blinders-1234.png")

    (sent,) = [r for r in stack.upstream.requests if r.reply == "image"]
    assert sent.prompt == "Portrait of Ábraza man, peaky blinders"
    assert sent.parameters == {
        "negative_prompt": "blurry",
        "width": 256,
        "height": 256,
        "num_inference_steps": 30,
        "guidance_scale": 7.5,
        "seed": 1234,
    }

    with page.expect_download() as download_info:
        link.click()
    download = download_info.value
    assert download.suggested_filename == "portrait-of-abraza-man-peaky-blinders-1234.png"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    with Image.open(saved) as image:
        assert (image.format, image.size) == ("PNG", (256, 256))

    # A second image with a random seed goes first in the gallery, with the seed the proxy drew.
    stack.upstream.default = Reply.image(format="png", compute_time=0.12)
    page.get_by_test_id("random-seed").check()
    page.get_by_test_id("prompt").fill("a lighthouse at dusk")
    generate.click()
    wait_for_image(page, count=2)
    drawn_seed = [r for r in stack.upstream.requests if r.reply == "image"][-1].parameters["seed"]
    expect(page.get_by_test_id("gallery-seed").first).to_have_text(str(drawn_seed))
    expect(page.get_by_test_id("download-link").first).to_have_attribute(
        "download", f"a-lighthouse-at-dusk-{drawn_seed}.png"
    )
    assert natural_width(page, 1) == 256

    page.screenshot(path=str(tmp_path / "gallery.png"), full_page=True)


def test_by_default_the_model_draws_at_its_own_size(stack: Stack, open_page: Callable[[Stack], Page]) -> None:
    """The size menus start at "Model default": no width or height is sent, the card shows the
    size of the image that came back (a tiny model's 64 px, SD 2.1's 768 px)."""
    stack.upstream.default = Reply.image(format="png", width=96, height=64)
    page = open_page(stack)
    expect(page.get_by_label("Width")).to_have_value("")
    page.get_by_test_id("prompt").fill("a cat")
    page.get_by_test_id("generate").click()
    wait_for_image(page)

    (sent,) = [r for r in stack.upstream.requests if r.reply == "image"]
    assert "width" not in sent.parameters and "height" not in sent.parameters
    assert natural_width(page) == 96
    expect(page.get_by_test_id("gallery-item")).to_contain_text("96×64, 30 steps")


def test_cold_start_shows_warming_up_with_eta_then_the_image(
    stack: Stack, open_page: Callable[[Stack], Page], traffic: Traffic
) -> None:
    stack.upstream.cold_start(3.0)
    page = open_page(stack)
    fill_form(page, "a red fox in the snow")
    page.get_by_test_id("generate").click()

    status = page.get_by_test_id("status-area")
    expect(status).to_have_attribute("data-phase", "loading")
    expect(status).to_contain_text(re.compile(r"Warming up the model, about [1-3] s left"))
    expect(status.get_by_role("progressbar")).to_be_visible()

    wait_for_image(page)
    expect(status).to_be_hidden()
    expect(page.get_by_test_id("gallery-timings")).to_contain_text("warm-up")
    replies = [r.reply for r in stack.upstream.requests]
    assert replies[0] == "loading" and replies[-1] == "image"
    # The progress came from the stream, not from a fallback request.
    assert traffic.to_path("/generate/stream") and not traffic.to_path("/generate")


def test_a_second_visitor_sees_their_place_in_the_queue(
    start_stack: Callable[..., Stack], open_page: Callable[[Stack], Page], page: Page
) -> None:
    stack = start_stack(max_concurrency=1)
    stack.upstream.default = Reply.image(format="png", compute_time=0.12, delay=1.5)
    first = open_page(stack)
    second = page.context.new_page()
    second.goto(stack.app_url)
    fill_form(first, "first visitor")
    fill_form(second, "second visitor")

    first.get_by_test_id("generate").click()
    expect(first.get_by_test_id("status-area")).to_have_attribute("data-phase", "generating")
    second.get_by_test_id("generate").click()

    status = second.get_by_test_id("status-area")
    expect(status).to_have_attribute("data-phase", "queued")
    expect(status).to_contain_text("Queued: you are next in line")
    wait_for_image(first)
    wait_for_image(second)
    expect(second.get_by_test_id("gallery-item")).to_contain_text("second visitor")


def test_rate_limit_shows_the_proxy_message_and_retry_time(
    start_stack: Callable[..., Stack], open_page: Callable[[Stack], Page], traffic: Traffic
) -> None:
    stack = start_stack(rate_limit_per_minute=5, rate_limit_burst=1)  # one token every 12 s
    page = open_page(stack)
    fill_form(page, "a watercolor fox")
    generate = page.get_by_test_id("generate")
    generate.click()
    wait_for_image(page)

    generate.click()
    error = page.get_by_role("alert")
    expect(error).to_be_visible()
    expect(error).to_have_attribute("data-code", "rate_limited")
    (refused,) = [r for r in traffic.to_path("/generate/stream") if r.status == 429]
    body = refused.json()["error"]
    assert body["code"] == "rate_limited" and 1 <= body["retry_after"] <= 12
    assert refused.headers["retry-after"] == str(body["retry_after"])
    expect(page.get_by_test_id("error-message")).to_have_text(body["message"])
    hint = page.get_by_test_id("retry-hint").inner_text()
    match = re.fullmatch(r": try again in (\d+) s", hint)
    assert match and body["retry_after"] - 2 <= int(match.group(1)) <= body["retry_after"], hint
    expect(error).to_contain_text("Rate limited: try again in")
    expect(generate).to_be_enabled()
    assert len([r for r in stack.upstream.requests if r.reply == "image"]) == 1


def test_error_event_in_the_stream_is_shown_as_written(
    stack: Stack, open_page: Callable[[Stack], Page], traffic: Traffic
) -> None:
    stack.upstream.default = Reply.error(404, "Model user/sd-raza does not exist")
    page = open_page(stack)
    fill_form(page, "a castle")
    page.get_by_test_id("generate").click()

    error = page.get_by_test_id("error-area")
    expect(error).to_be_visible()
    expect(error).to_have_attribute("data-code", "upstream_not_found")
    (streamed,) = stack.answers_to("POST", "/generate/stream")
    assert streamed.status == 200
    events = streamed.text
    match = re.search(r"event: error\r?\ndata: (.*)\r?\n", events)
    assert match, events
    expect(page.get_by_test_id("error-message")).to_have_text(json.loads(match.group(1))["error"]["message"])
    expect(page.get_by_test_id("gallery-image")).to_have_count(0)
    expect(page.get_by_test_id("generate")).to_be_enabled()


def test_falls_back_to_post_generate_when_streaming_is_unavailable(
    stack: Stack, open_page: Callable[[Stack], Page], traffic: Traffic
) -> None:
    page = open_page(stack)
    page.route("**/generate/stream", lambda route: route.fulfill(status=404, body="Not Found"))
    fill_form(page, "a paper boat", seed=77)
    page.get_by_test_id("generate").click()

    wait_for_image(page)
    expect(page.get_by_test_id("gallery-seed")).to_have_text("77")
    (fallback,) = traffic.to_path("/generate")
    assert fallback.request.method == "POST" and fallback.request.headers["accept"] == "application/json"
    assert fallback.status == 200


def test_empty_prompt_is_refused_in_the_page(
    stack: Stack, open_page: Callable[[Stack], Page], traffic: Traffic
) -> None:
    page = open_page(stack)
    page.get_by_test_id("generate").click()
    expect(page.get_by_test_id("form-problem")).to_have_text("Write a prompt first.")
    assert not traffic.to_path("/generate/stream")
    assert stack.upstream.requests == []


def _storage_and_cookies(page: Page) -> dict[str, str]:
    return {
        "localStorage": page.evaluate("() => JSON.stringify({...localStorage})"),
        "sessionStorage": page.evaluate("() => JSON.stringify({...sessionStorage})"),
        "document.cookie": page.evaluate("() => document.cookie"),
        "cookies": json.dumps(page.context.cookies()),
        "page HTML": page.content(),
    }


def test_the_token_never_reaches_the_browser(
    stack: Stack, open_page: Callable[[Stack], Page], traffic: Traffic, page: Page
) -> None:
    stack.upstream.cold_start(1.0)
    open_page(stack)
    fill_form(page, "a portrait in oil", seed=5)
    page.get_by_test_id("generate").click()
    wait_for_image(page)

    # The token is configured and used: the model server received it.
    image_requests = [r for r in stack.upstream.requests if r.reply == "image"]
    assert image_requests and image_requests[0].headers["authorization"] == f"Bearer {SENTINEL}"

    places = {f"{where} (after generating)": text for where, text in _storage_and_cookies(page).items()}
    for i, request in enumerate(traffic.requests):
        places[f"request {i} {request.method} {request.url}"] = "\n".join(
            [request.url, json.dumps(request.all_headers()), request.post_data or ""]
        )
    for i, response in enumerate(traffic.responses):
        places[f"response {i} {response.status} {response.url}"] = json.dumps(response.all_headers())
    # Bodies as the proxy sent them: the browser drops the body of a stream once the page stops reading.
    for i, answer in enumerate(stack.recorder.answers):
        places[f"answer {i} {answer.status} {answer.method} {answer.path}"] = answer.dump()
    (streamed,) = stack.answers_to("POST", "/generate/stream")
    assert "event: loading" in streamed.text and "event: image" in streamed.text
    assert {"/app/", "/status", "/generate/stream"} <= {a.path for a in stack.recorder.answers}

    page.reload()  # what the browser kept across a reload
    expect(page.get_by_test_id("prompt")).to_be_visible()
    places.update({f"{where} (after a reload)": text for where, text in _storage_and_cookies(page).items()})

    leaked = [where for where, text in places.items() if SENTINEL in text or "hf_SENTINEL" in text]
    assert leaked == []


def test_a_lora_served_by_fal_ai_shows_the_providers_queue_then_the_image(
    start_stack: Callable[..., Stack], open_page: Callable[[Stack], Page], monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    from sdclient.testing import FakeRouter, JobScript

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the fake Hub is local
    with FakeRouter() as router:
        router.add_model(
            "user/sks-cat-lora", "fal-ai", "fal-ai/lora", lora="pytorch_lora_weights.safetensors"
        )
        router.script("fal-ai", JobScript(queue_s=3.0, run_s=1.5))
        stack = start_stack(model="user/sks-cat-lora", router_url=router.url, hub_url=router.url)
        page = open_page(stack)
        fill_form(page, "a photo of sks cat", seed=11)
        page.get_by_test_id("generate").click()

        status = page.get_by_test_id("status-area")
        expect(status).to_have_attribute("data-phase", "queued")
        expect(status).to_contain_text(re.compile(r"Queued: (number [23] in line|you are next in line)"))
        expect(status).to_have_attribute("data-phase", "generating")
        wait_for_image(page)
        assert natural_width(page) == 256  # the size asked for reached fal-ai
        (submitted,) = [r for r in router.requests if r.method == "POST" and r.path.startswith("/fal-ai/")]
        assert submitted.json["image_size"] == {"width": 256, "height": 256}


@pytest.mark.parametrize(
    ("provider", "provider_id", "lora", "path"),
    [
        pytest.param(
            "replicate",
            "owner/flux-dev-lora",
            "lora.safetensors",
            "/replicate/v1/models/owner/flux-dev-lora/predictions",
            id="replicate",
        ),
        pytest.param(
            "together", "black-forest-labs/FLUX.1-dev", None, "/together/v1/images/generations", id="base64"
        ),
        pytest.param("hf-inference", None, None, "/hf-inference/models/user/a-model", id="hf-inference"),
    ],
)
def test_the_page_draws_through_every_other_kind_of_provider(
    start_stack: Callable[..., Stack],
    open_page: Callable[[Stack], Page],
    monkeypatch: pytest.MonkeyPatch,
    provider: str,
    provider_id: str | None,
    lora: str | None,
    path: str,
) -> None:
    import huggingface_hub.constants

    from sdclient.testing import FakeRouter

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the fake Hub is local
    with FakeRouter() as router:
        router.add_model("user/a-model", provider, provider_id, lora=lora)
        stack = start_stack(model="user/a-model", router_url=router.url, hub_url=router.url)
        page = open_page(stack)
        fill_form(page, "a photo of sks cat", seed=12)
        page.get_by_test_id("generate").click()
        wait_for_image(page)
        assert natural_width(page) == 256  # the size asked for reached the provider
        assert [r.path for r in router.requests if r.method == "POST"] == [path]
