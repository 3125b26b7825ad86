"""The job API over a real socket: create, follow, fetch the image, cancel, repeat safely, and
only the creator reads a job, until it expires."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
from proxy_harness import RunningProxy
from test_stream import names, parse_sse

from sdclient.testing import InferenceTestServer, Reply

KEY = "client-key-0123456789abcdef"
OTHER_KEY = "other-key-0123456789abcdefgh"


def _posts(upstream: InferenceTestServer) -> int:
    return len([r for r in upstream.requests if r.method == "POST"])


def wait_for_status(
    client: httpx.Client, job_id: str, statuses: set[str], within: float = 10.0
) -> dict[str, Any]:
    """Poll the job until its status is one of `statuses`; its view then."""
    deadline = time.monotonic() + within
    while True:
        view: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if view["status"] in statuses:
            return view
        assert time.monotonic() < deadline, f"job stayed {view['status']}"
        time.sleep(0.02)


def test_a_job_goes_queued_running_succeeded_and_its_image_is_served(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.default = Reply.image(delay=0.6)
    proxy = start_proxy(max_concurrency=1)
    with proxy.client() as client:
        first = client.post("/v1/jobs", json={"prompt": "one", "seed": 1})
        assert first.status_code == 202
        wait_for_status(client, first.json()["id"], {"running"})
        second = client.post("/v1/jobs", json={"prompt": "two", "seed": 2, "width": 128, "height": 64})
        job = second.json()
        assert second.status_code == 202
        assert second.headers["location"].endswith(f"/v1/jobs/{job['id']}")
        assert job["status"] == "queued" and job["result_url"] is None
        queued = wait_for_status(client, job["id"], {"queued", "running"})
        deadline = time.monotonic() + 2
        while queued["position"] is None and queued["status"] == "queued" and time.monotonic() < deadline:
            queued = client.get(f"/v1/jobs/{job['id']}").json()
        assert queued["status"] == "queued" and queued["position"] == 1  # one call ahead in line
        done = wait_for_status(client, job["id"], {"succeeded", "failed"})
        assert done["status"] == "succeeded", done
        assert done["seed"] == 2 and done["finished_at"] >= done["created_at"]
        assert done["result_url"].startswith(proxy.url + "/v1/images/img_")
        image = client.get(done["result_url"])
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg" and image.headers["x-seed"] == "2"
    assert image.content[:2] == b"\xff\xd8"
    assert upstream.requests[-1].parameters["width"] == 128


def test_a_job_on_a_cold_model_reports_its_eta(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.cold_start(1.5)
    proxy = start_proxy(max_wait_for_model=10)
    with proxy.client() as client:
        job = client.post("/v1/jobs", json={"prompt": "a fox"}).json()
        loading = wait_for_status(client, job["id"], {"running"})
        deadline = time.monotonic() + 3
        while loading["eta_s"] is None and loading["status"] == "running" and time.monotonic() < deadline:
            loading = client.get(f"/v1/jobs/{job['id']}").json()
        assert loading["status"] == "running" and 0 < loading["eta_s"] <= 1.5
        assert wait_for_status(client, job["id"], {"succeeded", "failed"})["status"] == "succeeded"


def test_job_events_are_the_events_of_the_stream(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.default = Reply.image(delay=0.5)
    body = {"prompt": "a lighthouse", "seed": 7}
    # Two proxies that each see the model for the first time: the same story from both routes.
    streaming, jobs = start_proxy(), start_proxy()
    with streaming.client() as client:
        stream = parse_sse(client.post("/generate/stream", json=body).text)
    with jobs.client() as client:
        job = client.post("/v1/jobs", json=body).json()
        response = client.get(f"/v1/jobs/{job['id']}/events")
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(response.text)
        again = parse_sse(client.get(f"/v1/jobs/{job['id']}/events").text)  # replayed once finished
    assert names(events) == names(stream) == ["queued", "generating", "image"]
    assert events[0][1] == stream[0][1] == {"position": 0}
    image, streamed = events[-1][1], stream[-1][1]
    assert set(image) == set(streamed) == {"image", "content_type", "seed", "timings", "request_id"}
    assert image["image"] == streamed["image"] and image["seed"] == 7
    assert names(again) == names(events)


def test_delete_cancels_a_running_or_queued_job_without_charging_it(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    upstream.default = Reply.image(delay=0.8)
    proxy = start_proxy(daily_quota=2, max_concurrency=1)
    with proxy.client() as client:
        running = client.post("/v1/jobs", json={"prompt": "one"}).json()
        wait_for_status(client, running["id"], {"running"})
        queued = client.post("/v1/jobs", json={"prompt": "two"}).json()
        for job in (queued, running):
            canceled = client.delete(f"/v1/jobs/{job['id']}")
            assert canceled.status_code == 200
            assert canceled.json()["status"] == "canceled"
            assert canceled.json()["error"]["code"] == "canceled"
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "canceled"
        events = parse_sse(client.get(f"/v1/jobs/{running['id']}/events").text)
        assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == "canceled"
        deadline = time.monotonic() + 5
        while proxy.app.state.proxy.jobs.running:  # the canceled generations wind down
            assert time.monotonic() < deadline, "canceled jobs still running"
            time.sleep(0.02)
        # Neither canceled job was charged: the quota of 2 still has both images.
        made = [client.post("/v1/jobs", json={"prompt": f"again {i}"}).json() for i in range(2)]
        refused = client.post("/v1/jobs", json={"prompt": "one too many"})
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
        for job in made:
            assert wait_for_status(client, job["id"], {"succeeded", "failed"})["status"] == "succeeded"
        # A finished job is deleted, with its image.
        done = client.get(f"/v1/jobs/{made[0]['id']}").json()
        assert client.delete(f"/v1/jobs/{done['id']}").status_code == 204
        assert client.get(f"/v1/jobs/{done['id']}").status_code == 404
        assert client.get(done["result_url"]).status_code == 404


def test_idempotency_key_returns_the_first_job_and_refuses_another_body(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy(daily_quota=1)
    body = {"prompt": "a fox", "seed": 5}
    with proxy.client() as client:
        first = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-17"})
        repeat = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-17"})
        other = client.post("/v1/jobs", json={**body, "seed": 6}, headers={"Idempotency-Key": "order-17"})
        wait_for_status(client, first.json()["id"], {"succeeded"})
        after = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-17"})
    assert first.status_code == 202
    assert repeat.status_code == 200 and repeat.json()["id"] == first.json()["id"]
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    assert after.status_code == 200 and after.json()["status"] == "succeeded"  # charged once: quota 1
    assert _posts(upstream) == 1


def test_only_the_creator_reads_a_job_and_its_image(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy(api_keys=[KEY, OTHER_KEY])
    with proxy.client(headers={"Authorization": f"Bearer {KEY}"}) as mine:
        job = mine.post("/v1/jobs", json={"prompt": "mine"}).json()
        done = wait_for_status(mine, job["id"], {"succeeded"})
        assert mine.get(done["result_url"]).status_code == 200
    assert job["id"].startswith("job_") and len(job["id"]) >= 4 + 24  # 144 random bits
    with proxy.client(headers={"X-API-Key": OTHER_KEY}) as theirs:
        answers = [
            theirs.get(f"/v1/jobs/{job['id']}"),
            theirs.get(f"/v1/jobs/{job['id']}/events"),
            theirs.get(done["result_url"]),
            theirs.delete(f"/v1/jobs/{job['id']}"),
        ]
    assert [a.status_code for a in answers] == [404] * 4
    assert all(a.json()["error"]["code"] == "not_found" for a in answers)
    with proxy.client() as anonymous:
        assert anonymous.get(f"/v1/jobs/{job['id']}").status_code == 401


def test_jobs_and_images_expire_after_the_job_ttl(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy(job_ttl_s=1.0)
    with proxy.client() as client:
        job = client.post("/v1/jobs", json={"prompt": "short-lived"}).json()
        done = wait_for_status(client, job["id"], {"succeeded"})
        assert client.get(done["result_url"]).status_code == 200
        time.sleep(1.1)
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert client.get(done["result_url"]).status_code == 404


async def test_many_jobs_at_once_each_get_their_image(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy()
    async with proxy.async_client() as client:
        created = await asyncio.gather(
            *(client.post("/v1/jobs", json={"prompt": f"p{i}", "seed": i}) for i in range(8))
        )
        ids = [c.json()["id"] for c in created]
        deadline = time.monotonic() + 10
        while True:
            views = [(await client.get(f"/v1/jobs/{i}")).json() for i in ids]
            if all(v["status"] == "succeeded" for v in views):
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert sorted(v["seed"] for v in views) == list(range(8))


async def test_concurrent_posts_with_one_idempotency_key_make_one_job(
    start_proxy: Callable[..., RunningProxy], upstream: InferenceTestServer
) -> None:
    proxy = start_proxy()
    body = {"prompt": "once", "seed": 3}
    async with proxy.async_client(headers={"Idempotency-Key": "same"}) as client:
        answers = await asyncio.gather(*(client.post("/v1/jobs", json=body) for _ in range(5)))
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 200, 202]
    assert len({a.json()["id"] for a in answers}) == 1
