"""What a public deployment relies on: one visitor's request is one upstream job, requests over
the cost budget are refused before anything is sent, the public never sees the upstream's URL or
text, redirects stay on the proxy's own origin, the cache's bound counts every entry, and a broken
usage database is reported instead of crashing.

Over real sockets: the proxy under uvicorn in front of `sdclient.testing`'s server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from proxy_harness import SENTINEL, RunningProxy

from sdclient.testing import InferenceTestServer, Reply

BODY = {"prompt": "a lighthouse at dusk", "seed": 7}


def _posts(upstream: InferenceTestServer) -> int:
    return len([r for r in upstream.requests if r.method == "POST"])


# -- one visitor's request, one upstream job --------------------------------------------------


def test_a_generation_longer_than_the_upstream_timeout_is_sent_once(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.default = Reply.image(delay=3.0)  # still generating when the proxy stops waiting
    proxy = start_proxy(upstream_timeout=0.5, max_retries=3)
    with proxy.client() as client:
        response = client.post("/generate", json=BODY)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert _posts(upstream) == 1


def test_a_connection_that_fails_before_sending_is_still_retried(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.enqueue(Reply.reset())
    proxy = start_proxy(max_retries=1)
    with proxy.client() as client:
        response = client.post("/generate", json=BODY)
    assert response.status_code == 200, response.text
    assert _posts(upstream) == 2


# -- the cost budget of one request -------------------------------------------------------------

ROUTES = ("/generate", "/generate/stream", "/v1/jobs", "/v1/images/generations")


def _body(route: str, **fields: Any) -> dict[str, Any]:
    """A body for `route` with the generation `fields` (width and height as OpenAI's `size`)."""
    body: dict[str, Any] = {"prompt": "a lighthouse at dusk", **fields}
    if route == "/v1/images/generations" and "width" in body:
        body["size"] = f"{body.pop('width')}x{body.pop('height')}"
    return body


def _error(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


@pytest.mark.parametrize("route", ROUTES)
def test_a_request_over_the_cost_budget_is_a_422_naming_it_on_every_route(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer, route: str
) -> None:
    proxy = start_proxy(max_megapixel_steps=1.0, daily_quota=1)
    with proxy.client() as client:
        over = client.post(route, json=_body(route, width=512, height=512, num_inference_steps=10))
        within = client.post(route, json=_body(route, width=256, height=256, num_inference_steps=10))
    assert over.status_code == 422, over.text
    message = _error(over)["message"]
    assert "width x height x num_inference_steps = 512 x 512 x 10 = 2.6 megapixel-steps" in message
    assert "budget of 1.0 (SDPROXY_MAX_MEGAPIXEL_STEPS)" in message
    # Refused before the quota is charged (one image a day) and before anything is sent upstream.
    assert within.status_code in (200, 202), within.text
    assert _posts(upstream) <= 1


def test_the_default_budget_is_one_1024px_image_at_30_steps(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy()
    with proxy.client() as client:
        default = client.post("/generate", json=BODY)
        largest = client.post(
            "/generate", json={**BODY, "width": 1024, "height": 1024, "num_inference_steps": 30}
        )
        more_steps = client.post("/generate", json={**BODY, "num_inference_steps": 31})
    assert default.status_code == 200 and largest.status_code == 200
    assert more_steps.status_code == 422
    assert (
        "1024 x 1024 x 31 = 32.5 megapixel-steps, over this proxy's budget of 31.5"
        in _error(more_steps)["message"]
    )
    assert _posts(upstream) == 2


def test_the_openai_routes_n_counts_n_times_and_is_bounded(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy(max_megapixel_steps=4.0, max_images_per_request=3)
    route = "/v1/images/generations"
    with proxy.client() as client:
        one = client.post(route, json=_body(route, width=512, height=512, num_inference_steps=10))
        two = client.post(route, json=_body(route, n=2, width=512, height=512, num_inference_steps=10))
        four = client.post(route, json=_body(route, n=4, width=64, height=64, num_inference_steps=1))
    assert one.status_code == 200, one.text
    assert two.status_code == 422
    assert "n x width x height x num_inference_steps = 2 x 512 x 512 x 10 = 5.2" in _error(two)["message"]
    assert four.status_code == 422
    assert "SDPROXY_MAX_IMAGES_PER_REQUEST" in _error(four)["message"]
    assert _posts(upstream) == 1


@pytest.mark.parametrize("route", ROUTES)
def test_prompt_length_limits_hold_on_every_route(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer, route: str
) -> None:
    proxy = start_proxy(max_prompt_length=40)
    with proxy.client() as client:
        long_prompt = client.post(route, json={"prompt": "x" * 41})
        long_negative = client.post(route, json={"prompt": "a fox", "negative_prompt": "y" * 41})
        over_schema = client.post(route, json={"prompt": "z" * 2001})
    for response in (long_prompt, long_negative):
        assert response.status_code == 422, response.text
        assert "more than this proxy's 40 (SDPROXY_MAX_PROMPT_LENGTH)" in _error(response)["message"]
    assert "negative_prompt" in _error(long_negative)["message"]
    # Past the schema's own bound: a validation error (OpenAI's 400 on its route).
    assert over_schema.status_code == (400 if route == "/v1/images/generations" else 422)
    assert "prompt" in _error(over_schema)["message"]
    assert _posts(upstream) == 0


def test_the_request_limits_default_to_the_schemas_own_bounds() -> None:
    from proxy import Settings
    from proxy.schemas import MAX_IMAGES, MAX_PROMPT_LENGTH

    for name, bound in (("max_images_per_request", MAX_IMAGES), ("max_prompt_length", MAX_PROMPT_LENGTH)):
        field = Settings.model_fields[name]
        assert field.default == bound
        assert any(getattr(rule, "le", None) == bound for rule in field.metadata)


def _chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), 1024):
        yield data[start : start + 1024]


@pytest.mark.parametrize("route", ROUTES)
def test_the_body_size_limit_holds_on_every_route(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer, route: str
) -> None:
    proxy = start_proxy(max_body_bytes=2048)
    big = json.dumps({"prompt": "a fox", "negative_prompt": "n" * 1800, "user": "u" * 200}).encode()
    headers = {"content-type": "application/json"}
    with proxy.client() as client:
        declared = client.post(route, content=big, headers=headers)
        chunked = client.post(route, content=_chunks(big), headers=headers)
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert "larger than 2048 bytes" in _error(response)["message"]
    assert _posts(upstream) == 0


# -- redirects ----------------------------------------------------------------------------------


def test_app_redirects_stay_on_the_proxys_own_origin(
    start_proxy: Callable[..., RunningProxy], tmp_path: Path
) -> None:
    site = tmp_path / "site"
    (site / "docs").mkdir(parents=True)
    (site / "index.html").write_text("<!doctype html><title>app</title>")
    (site / "docs" / "index.html").write_text("<!doctype html><title>docs</title>")
    proxy = start_proxy(static_dir=site)
    evil = {"Host": "evil.example"}
    with proxy.client(follow_redirects=False) as client:
        answers = {path: client.get(path, headers=evil) for path in ("/", "/app", "/app/docs", "/status/")}
    for path, response in answers.items():
        assert response.status_code in (301, 302, 307, 308), (path, response.status_code)
        location = response.headers["location"]
        assert location.startswith("/") and not location.startswith("//"), (path, location)
        assert "evil.example" not in location
    assert answers["/app"].headers["location"] == "/app/"
    assert answers["/app/docs"].headers["location"] == "/app/docs/"


@pytest.mark.parametrize(
    ("location", "relative"),
    [
        ("http://evil.example/app/", "/app/"),
        ("https://evil.example/app/docs/?page=2", "/app/docs/?page=2"),
        ("//evil.example/app/", "/app/"),
        ("http://proxy.example//evil.example/x", "/evil.example/x"),
        ("http://proxy.example/\\evil.example/x", "/evil.example/x"),
        ("/app/", "/app/"),
        ("http://proxy.example", "/"),
    ],
)
def test_relative_location_never_names_a_host(location: str, relative: str) -> None:
    from proxy.middleware import relative_location

    assert relative_location(location) == relative


# -- the public never sees the upstream's URL or raw text ---------------------------------------


def _echoing_replies(url: str) -> dict[str, Reply]:
    """Every kind of upstream answer, each echoing the upstream's URL and the proxy's token."""
    said = f"{url}/models/test/model says {SENTINEL}: " + "details " * 200
    headers = {"x-request-id": f"{url}#{SENTINEL}"}
    return {
        "loading": Reply.status(
            503, {"error": f"Model loading on {said}", "estimated_time": 30.0}, headers=headers
        ),
        "400": Reply.error(400, said, headers=headers),
        "401": Reply.error(401, said, headers=headers),
        "402": Reply.error(402, said, headers=headers),
        "404": Reply.error(404, said, headers=headers),
        "422": Reply.status(422, {"error": [said, said]}, headers=headers),
        "429": Reply.status(429, {"error": said}, headers={**headers, "retry-after": "3"}),
        "500": Reply.error(500, said, headers=headers),
        "502-html": Reply.status(502, f"<html><h1>Bad gateway</h1><p>{said}</p></html>", "text/html"),
        "503": Reply.error(503, said, headers=headers),
        "200-text": Reply.status(200, said, "text/plain", headers=headers),
    }


def test_no_public_answer_shows_the_upstreams_url_or_raw_text(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy(max_retries=0, max_wait_for_model=1.0)
    host = f"127.0.0.1:{upstream.port}"
    statuses = []
    with proxy.client() as client:
        for name, reply in _echoing_replies(upstream.url).items():
            upstream.default = reply
            answers = [
                client.post("/generate", json=BODY),
                client.post("/generate", json=BODY, headers={"accept": "application/json"}),
                client.post("/generate/stream", json=BODY),
                client.post("/v1/images/generations", json={"prompt": "a fox"}),
            ]
            job = client.post("/v1/jobs", json=BODY).json()
            answers.append(client.get(f"/v1/jobs/{job['id']}/events"))  # follows the job to its end
            answers.append(client.get(f"/v1/jobs/{job['id']}"))
            status = client.get("/status")
            statuses.append(status.json())
            for answer in answers:
                assert answer.status_code >= 400 or "error" in answer.text, (name, answer.text[:200])
                assert len(answer.content) < 2000, (name, answer.text[:300])
    assert {s["state"] for s in statuses} >= {"loading", "unavailable"}
    for text in proxy.seen.answers:  # every body, header and SSE event of the test
        assert SENTINEL not in text
        assert host not in text and upstream.url not in text, text[:400]
        assert "details " * 25 not in text  # a short excerpt at most, never the raw body


# -- a broken usage database --------------------------------------------------------------------


def _corrupt_db(tmp_path: Path) -> Path:
    path = tmp_path / "usage.db"
    path.write_bytes(b"this is not an SQLite database, only junk " * 100)
    return path


def test_check_opens_the_usage_db_and_reports_a_corrupt_one(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from proxy.cli import app

    runner = CliRunner()
    env = {"SDPROXY_MODEL": "http://127.0.0.1:9/models/demo"}
    bad = runner.invoke(app, ["check"], env={**env, "SDPROXY_USAGE_DB": str(_corrupt_db(tmp_path))})
    assert bad.exit_code == 2, bad.output
    said = " ".join(bad.output.split())  # as one line, whatever the terminal's width
    assert "SDPROXY_USAGE_DB" in said and "cannot be used as the usage database" in said
    assert "Traceback" not in said
    good = runner.invoke(app, ["check"], env={**env, "SDPROXY_USAGE_DB": str(tmp_path / "new.db")})
    assert good.exit_code == 0, good.output
    assert (tmp_path / "new.db").is_file()


def test_serve_refuses_a_corrupt_usage_db_with_the_same_message(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SDPROXY_") and k != "HF_TOKEN"}
    env.update({"SDPROXY_USAGE_DB": str(_corrupt_db(tmp_path)), "NO_COLOR": "1", "COLUMNS": "200"})
    command = [sys.executable, "-m", "proxy.cli", "serve", "--model", "http://127.0.0.1:9/models/demo"]
    done = subprocess.run([*command, "--port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    said = " ".join(done.stderr.split())
    assert "SDPROXY_USAGE_DB" in said and "cannot be used as the usage database" in said
    assert "Traceback" not in said


def test_create_app_refuses_a_corrupt_usage_db(upstream: InferenceTestServer, tmp_path: Path) -> None:
    from proxy_harness import make_settings

    from proxy import ConfigError, create_app

    with pytest.raises(ConfigError, match="SDPROXY_USAGE_DB"):
        create_app(make_settings(upstream, usage_db=_corrupt_db(tmp_path)))


def test_every_setting_is_in_the_documentation() -> None:
    from proxy import Settings

    docs = (Path(__file__).parents[2] / "docs" / "proxy.md").read_text()
    missing = [
        name for name in Settings.model_fields if name != "hf_token" and f"SDPROXY_{name.upper()}" not in docs
    ]
    assert not missing, f"not in docs/proxy.md: {missing}"
