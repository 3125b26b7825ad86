"""Usage counters, budgets, and SQLite persistence shared by several processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from client_harness import MakeClient

import sdclient
from sdclient import UsageTracker, UsageWarning
from sdclient.testing import InferenceTestServer, Reply


async def test_counters_per_model(server: InferenceTestServer, make_client: MakeClient):
    tracker = UsageTracker()
    fox = make_client(usage=tracker)
    cat = make_client(server.model_url("user/other"), usage=tracker)
    server.enqueue(Reply.html(502), Reply.image(compute_time=0.5))

    await fox.generate("a fox", negative_prompt="blur")  # 1 retry
    await fox.generate("a fox again")
    await cat.generate("cat")
    server.default = Reply.error(404, "no such model")
    with pytest.raises(sdclient.ModelNotFound):
        await cat.generate("cat")

    snapshot = tracker.snapshot()
    fox_usage = snapshot.models[fox.model]
    assert fox_usage.requests == 3
    assert fox_usage.images == 2
    assert fox_usage.prompt_characters == len("a fox") + len("blur") + len("a fox again")
    assert fox_usage.compute_seconds == pytest.approx(0.55)
    assert fox_usage.retries == 1
    assert fox_usage.failures == {}
    cat_usage = snapshot.models[cat.model]
    assert (cat_usage.requests, cat_usage.images, cat_usage.failures) == (2, 1, {"ModelNotFound": 1})
    assert snapshot.total.requests == 5
    assert snapshot.total.images == 3
    assert snapshot.total.failures == {"ModelNotFound": 1}
    assert fox.usage == snapshot  # the client's view of a shared tracker
    assert snapshot.model_dump(mode="json")["total"]["images"] == 3


async def test_image_budget_refuses_before_sending(server: InferenceTestServer, make_client: MakeClient):
    client = make_client(usage=UsageTracker(max_images=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UsageWarning)
        await client.generate("a")
        await client.generate("b")

    with pytest.raises(sdclient.UsageLimitExceeded) as info:
        await client.generate("c")

    assert len(server.requests) == 2
    exc = info.value
    assert (exc.budget, exc.limit, exc.used, exc.requested) == ("images", 2, 2, 1)
    assert "nothing was sent" in str(exc)
    assert client.usage.total.failures == {"UsageLimitExceeded": 1}


@pytest.mark.filterwarnings("ignore::sdclient.UsageWarning")
async def test_character_budget_counts_calls_in_flight(server: InferenceTestServer, make_client: MakeClient):
    import asyncio

    server.default = Reply.image(delay=0.2)
    client = make_client(usage=UsageTracker(max_characters=25))

    results = await asyncio.gather(*(client.generate("ten chars!") for _ in range(3)), return_exceptions=True)

    # Two fit (20 characters); the third would make 30 even though none had finished yet.
    assert sum(isinstance(r, sdclient.UsageLimitExceeded) for r in results) == 1
    assert len(server.requests) == 2


async def test_warning_at_80_percent_once(server: InferenceTestServer, make_client: MakeClient):
    client = make_client(usage=UsageTracker(max_images=5))
    for prompt in "abc":
        await client.generate(prompt)  # 3 of 5: no warning
    with pytest.warns(UsageWarning, match="images usage at 4 of the budget 5"):
        await client.generate("d")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await client.generate("e")  # already warned: silent


def test_negative_budget_is_refused():
    with pytest.raises(ValueError, match="max_images"):
        UsageTracker(max_images=-1)


async def test_persisted_usage_survives_a_restart(
    server: InferenceTestServer, make_client: MakeClient, tmp_path: Path
):
    path = tmp_path / "usage.sqlite"
    first = UsageTracker(path)
    await make_client(usage=first).generate("a fox")
    first.close()

    second = UsageTracker(path)
    await make_client(usage=second).generate("a fox")
    assert second.snapshot().total.images == 2
    assert second.snapshot().total.prompt_characters == 10


def test_persisted_budget_counts_earlier_runs(tmp_path: Path):
    path = tmp_path / "usage.sqlite"
    UsageTracker(path).record("m", images=3)
    tracker = UsageTracker(path, max_images=3)
    with pytest.raises(sdclient.UsageLimitExceeded), tracker.reserve(images=1, characters=0):
        pass


_WORKER = textwrap.dedent(
    """
    import sys
    from sdclient import UsageTracker

    path, worker, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tracker = UsageTracker(path)
    for i in range(rounds):
        tracker.record("user/model", requests=1, images=1, prompt_characters=3, compute_seconds=0.25,
                       failure="ServerError" if i % 10 == 0 else None)
        tracker.record(f"worker/{worker}", requests=1)
    """
)


def test_several_processes_increment_one_file_without_losing_counts(tmp_path: Path):
    path = tmp_path / "shared.sqlite"
    workers, rounds = 4, 100
    processes = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(path), str(n), str(rounds)])
        for n in range(workers)
    ]
    for process in processes:
        assert process.wait(timeout=120) == 0

    snapshot = UsageTracker(path).snapshot()
    shared = snapshot.models["user/model"]
    assert shared.requests == workers * rounds
    assert shared.images == workers * rounds
    assert shared.prompt_characters == 3 * workers * rounds
    assert shared.compute_seconds == pytest.approx(0.25 * workers * rounds)
    assert shared.failures == {"ServerError": workers * rounds // 10}
    assert all(snapshot.models[f"worker/{n}"].requests == rounds for n in range(workers))
    assert snapshot.total.requests == 2 * workers * rounds


async def test_an_endpoint_without_compute_time_counts_the_measured_time(
    server: InferenceTestServer, make_client: MakeClient
):
    # The Inference Endpoints server sends no x-compute-time: the answered request's own time counts.
    server.default = Reply.image(delay=0.2, compute_time=None)
    client = make_client()
    image = await client.generate("a fox")
    assert image.timings.compute_s is None
    assert 0.2 <= image.timings.request_s < 1.0
    assert client.usage.models[client.model].compute_seconds == pytest.approx(image.timings.request_s)
