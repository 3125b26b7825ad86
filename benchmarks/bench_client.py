"""Benchmark SDClient against raw httpx and huggingface_hub's AsyncInferenceClient.

All three call one local server of the protocol (`python -m sdclient.testing`, in a subprocess so
it does not share this process's GIL) that answers every request at once with a ~50 KB 512x512
JPEG. Throughput is measured at concurrency 1, 16 and 64 in many short rounds; within a round the
clients run back to back (taking turns going first), and a ratio is the median over the
rounds of the per-round ratios, so background load on a shared machine affects both sides of each
comparison alike. The client's CPU time per request is printed too. Beside them (informational:
no target), SDClient with `http_backend="aiohttp"`, and raw httpx2 (the httpx fork huggingface_hub
2.x sends with). Then a cold start of T seconds with 50 concurrent calls.

Then where SDClient's time goes, without a network (`httpx.MockTransport` answering the server's
image): microseconds per call of raw httpx and of SDClient, and of SDClient with each of two layers
taken out in place (a counterfactual, patched for the measurement only): tenacity's attempt loop
(the try awaited bare) and Pillow's header read (a stub that knows the answer's format and size).

Targets (PASS/FAIL printed for each; exit status 1 if any fails):
  - SDClient within 0.9x-1.1x raw httpx and >= 1.0x AsyncInferenceClient at every level;
  - cold start: first image <= T + 1.5 s after the first call, and after the first 503 has
    come back at most 10 further requests reach the server before the model is ready.

Usage:
    python benchmarks/bench_client.py            # full run (about 1.5 minutes)
    python benchmarks/bench_client.py --quick    # short run, cold start of 3 s
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from unittest import mock

import httpx
import httpx2
from huggingface_hub import AsyncInferenceClient
from PIL import Image

from sdclient import GenerationEvent, SDClient
from sdclient.testing import spawn_server

MODEL_ID = "bench/sd-model"
IMAGE_SIDE = 512
LEVELS = (1, 16, 64)
PROMPT = "portrait of abraza man as a peaky blinders character"
POOL = httpx.Limits(max_connections=100, max_keepalive_connections=100)  # what SDClient uses by default

Call = Callable[[], Awaitable[object]]


@dataclass
class Plan:
    requests: dict[int, int]
    rounds: int
    cold_start_s: float
    breakdown_calls: int
    cold_start_calls: int = 50


FULL = Plan(requests={1: 100, 16: 250, 64: 400}, rounds=16, cold_start_s=10.0, breakdown_calls=3000)
QUICK = Plan(requests={1: 60, 16: 150, 64: 200}, rounds=6, cold_start_s=3.0, breakdown_calls=500)


@dataclass
class Rounds:
    """Figures of one client at one level, one entry per round."""

    req_per_s: list[float] = field(default_factory=list)
    """Requests per second of wall-clock time."""
    cpu_us: list[float] = field(default_factory=list)
    """Microseconds of this process's CPU time per request: the client's own cost (the server
    runs in another process), much less disturbed than wall-clock time on a busy machine."""

    @property
    def best(self) -> float:
        return max(self.req_per_s)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_us)

    def ratio(self, other: Rounds) -> float:
        """Median over the rounds of this client's req/s over the other's in the same round.

        The clients run back to back within a round, so a ratio compares them under the same
        background load; the median discards the rounds another job disturbed.
        """
        return statistics.median(a / b for a, b in zip(self.req_per_s, other.req_per_s, strict=True))


async def measure(call: Call, concurrency: int, total: int) -> tuple[float, float]:
    """(requests per second, client CPU microseconds per request) for `total` calls made by
    `concurrency` workers."""
    remaining = iter(range(total))

    async def worker() -> None:
        for _ in remaining:
            await call()

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - start), (time.process_time() - cpu) / total * 1e6


def seed() -> int:
    return random.randrange(2**32)


async def throughput(url: str, plan: Plan) -> dict[int, dict[str, Rounds]]:
    """Figures per level and client, round by round."""
    results: dict[int, dict[str, Rounds]] = {}
    model_url = f"{url}/models/{MODEL_ID}"
    body_headers = {"Accept": "image/png"}
    for level in LEVELS:
        async with (
            SDClient(model_url, max_retries=0) as sd,
            SDClient(model_url, max_retries=0, http_backend="aiohttp") as sd_aiohttp,
            httpx.AsyncClient(limits=POOL, timeout=60.0) as raw,
            httpx2.AsyncClient(
                limits=httpx2.Limits(max_connections=100, max_keepalive_connections=100), timeout=60.0
            ) as raw2,
            AsyncInferenceClient(model=model_url, timeout=60.0) as hf,
        ):

            async def sdclient_call() -> object:
                return await sd.generate(PROMPT)

            async def aiohttp_call() -> object:
                return await sd_aiohttp.generate(PROMPT)

            async def httpx_call() -> object:
                response = await raw.post(
                    model_url, json={"inputs": PROMPT, "parameters": {"seed": seed()}}, headers=body_headers
                )
                response.raise_for_status()
                return response.content

            async def httpx2_call() -> object:
                response = await raw2.post(
                    model_url, json={"inputs": PROMPT, "parameters": {"seed": seed()}}, headers=body_headers
                )
                response.raise_for_status()
                return response.content

            async def hf_call() -> object:
                return await hf.text_to_image(PROMPT, seed=seed())

            calls: dict[str, Call] = {
                "sdclient": sdclient_call,
                "httpx": httpx_call,
                "hf_async": hf_call,
                "sd_aiohttp": aiohttp_call,
                "httpx2": httpx2_call,
            }
            rounds = {name: Rounds() for name in calls}
            for call in calls.values():  # warm up: connections, caches, imports
                await measure(call, level, max(2 * level, 20))
            for round_ in range(plan.rounds):
                names = list(calls)
                names = names[round_ % len(names) :] + names[: round_ % len(names)]  # take turns going first
                for name in names:
                    rate, cpu = await measure(calls[name], level, plan.requests[level])
                    rounds[name].req_per_s.append(rate)
                    rounds[name].cpu_us.append(cpu)
            results[level] = rounds
            print(
                f"  concurrency {level:>2}: "
                + "   ".join(f"{n} {r.best:5.0f} req/s {r.cpu:5.0f} us CPU" for n, r in rounds.items()),
                flush=True,
            )
    return results


@dataclass
class _KnownHeader:
    """What ``Image.open`` gives ``SDClient`` (format and size, as a context manager), known in advance."""

    format: str | None
    size: tuple[int, int]

    def __enter__(self) -> _KnownHeader:
        return self

    def __exit__(self, *_: object) -> None:
        return None


@contextmanager
def without(layer: str, image: bytes) -> Iterator[None]:
    """SDClient with one layer taken out, for a counterfactual measurement only.

    ``"tenacity"``: each call's try is awaited bare instead of under tenacity's attempt loop.
    ``"pillow"``: ``Image.open`` returns a stub with ``image``'s format and size, read beforehand.
    """
    if layer == "tenacity":

        async def bare(attempt: Callable[[], Awaitable[object]], **_: object) -> object:
            return await attempt()

        with mock.patch("sdclient._client.call_with_retries", bare):
            yield
    elif layer == "pillow":
        with Image.open(io.BytesIO(image)) as real:
            header = _KnownHeader(real.format, real.size)
        with mock.patch.object(Image, "open", lambda _fp: header):
            yield
    else:
        raise ValueError(layer)


async def breakdown(image: bytes, calls: int) -> dict[str, float]:
    """Microseconds per call (best of 5 runs of ``calls``) with no network: an
    ``httpx.MockTransport`` answers every request with ``image`` at once."""

    def answer(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=image, headers={"content-type": "image/jpeg"})

    url = f"http://127.0.0.1:9/models/{MODEL_ID}"
    transport = httpx.MockTransport(answer)

    async def best(call: Call) -> float:
        for _ in range(calls // 10):  # warm up
            await call()
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                await call()
            runs.append((time.perf_counter() - start) / calls * 1e6)
        return min(runs)

    costs: dict[str, float] = {}
    async with httpx.AsyncClient(transport=transport) as raw:
        costs["raw httpx"] = await best(
            lambda: raw.post(
                url, json={"inputs": PROMPT, "parameters": {"seed": seed()}}, headers={"Accept": "image/png"}
            )
        )
    variants = {
        "SDClient": (),
        "SDClient without tenacity's attempt loop": ("tenacity",),
        "SDClient without Pillow's header read": ("pillow",),
        "SDClient without both": ("tenacity", "pillow"),
    }
    for name, layers in variants.items():
        with ExitStack() as stack:
            for layer in layers:
                stack.enter_context(without(layer, image))
            async with (
                httpx.AsyncClient(transport=transport) as http,
                SDClient(url, max_retries=0, http_client=http) as sd,
            ):
                costs[name] = await best(lambda: sd.generate(PROMPT))
    return costs


@dataclass
class ColdStart:
    first_image_s: float
    all_images_s: float
    sends_before_first_503: int
    further_requests: int
    server_requests_while_loading: int


async def cold_start(plan: Plan) -> ColdStart:
    """50 concurrent calls against a model that loads for T seconds from the first request."""
    with spawn_server(cold_start=plan.cold_start_s, size=IMAGE_SIDE, model_id=MODEL_ID) as url:
        log: list[tuple[float, str]] = []

        def on_event(event: GenerationEvent) -> None:
            log.append((time.monotonic(), event.kind))

        async with SDClient(f"{url}/models/{MODEL_ID}", on_event=on_event) as client:
            start = time.monotonic()
            first_done: list[float] = []

            async def one() -> None:
                await client.generate(PROMPT)
                if not first_done:
                    first_done.append(time.monotonic())

            await asyncio.gather(*(one() for _ in range(plan.cold_start_calls)))
            finished = time.monotonic()
        async with httpx.AsyncClient() as http:
            stats = (await http.get(f"{url}/stats")).json()

    first_503 = min(t for t, kind in log if kind == "loading")
    ready = first_done[0]
    sends = [t for t, kind in log if kind == "sending"]
    return ColdStart(
        first_image_s=ready - start,
        all_images_s=finished - start,
        sends_before_first_503=sum(t <= first_503 for t in sends),
        # Requests sent after the first 503 came back, except the one that got the first image.
        further_requests=sum(first_503 < t < ready for t in sends) - 1,
        server_requests_while_loading=int(stats["requests_while_loading"]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, 2 rounds, a 3 s cold start")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    checks: list[tuple[bool, str]] = []
    with spawn_server(size=IMAGE_SIDE, model_id=MODEL_ID) as url:
        image = httpx.post(f"{url}/models/{MODEL_ID}", json={"inputs": PROMPT}).content
        size = len(image)
        print(f"server: python -m sdclient.testing (subprocess) at {url}")
        print(f"answer: {IMAGE_SIDE}x{IMAGE_SIDE} JPEG, {size} bytes, at once")
        print(f"throughput, {plan.rounds} rounds ({plan.requests} requests per round and level):")
        results = asyncio.run(throughput(url, plan))

    print()
    print("req/s: best round; ratios: median of the per-round ratios; CPU: median us per request")
    print(
        f"{'concurrency':>11} {'sdclient':>9} {'httpx':>9} {'hf_async':>9} {'sd/httpx':>9} {'sd/hf':>7} |"
        f" {'CPU sd':>7} {'httpx':>7} {'hf':>7} | {'sd_aiohttp':>10} {'/httpx':>7} {'CPU':>5}"
        f" | {'httpx2':>7} {'/httpx':>7} {'CPU':>5}"
    )
    for level, rates in results.items():
        sd, raw, hf, aio = rates["sdclient"], rates["httpx"], rates["hf_async"], rates["sd_aiohttp"]
        raw2 = rates["httpx2"]
        vs_httpx, vs_hf = sd.ratio(raw), sd.ratio(hf)
        print(
            f"{level:>11} {sd.best:>9.0f} {raw.best:>9.0f} {hf.best:>9.0f}"
            f" {vs_httpx:>8.2f}x {vs_hf:>6.2f}x | {sd.cpu:>7.0f} {raw.cpu:>7.0f} {hf.cpu:>7.0f}"
            f" | {aio.best:>10.0f} {aio.ratio(raw):>6.2f}x {aio.cpu:>5.0f}"
            f" | {raw2.best:>7.0f} {raw2.ratio(raw):>6.2f}x {raw2.cpu:>5.0f}"
        )
        checks.append(
            (
                0.9 <= vs_httpx <= 1.1,
                f"SDClient within 0.9x-1.1x raw httpx at concurrency {level}: {vs_httpx:.2f}x",
            )
        )
        checks.append(
            (vs_hf >= 1.0, f"SDClient >= 1.0x AsyncInferenceClient at concurrency {level}: {vs_hf:.2f}x")
        )

    print()
    print("where SDClient's time goes, without a network (MockTransport, the same image):")
    costs = asyncio.run(breakdown(image, plan.breakdown_calls))
    base = costs["SDClient"] - costs["raw httpx"]
    raw_cpu = results[1]["httpx"].cpu  # raw httpx's CPU per request at concurrency 1, over the socket
    for name, us in costs.items():
        line = f"  {name:<40} {us:6.0f} us a call"
        if name != "raw httpx":
            added = us - costs["raw httpx"]
            line += f"   {added:+5.0f} us over raw httpx"
            if name != "SDClient":
                line += f" ({added - base:+4.0f} us)"
            # What that overhead makes of concurrency 1 over the socket, where raw httpx costs raw_cpu.
            line += f"   implies {raw_cpu / (raw_cpu + added):.2f}x raw httpx at concurrency 1"
        print(line)

    t = plan.cold_start_s
    print()
    print(f"cold start: T = {t:g} s, {plan.cold_start_calls} concurrent calls")
    cold = asyncio.run(cold_start(plan))
    calls = plan.cold_start_calls
    print(f"  first image after {cold.first_image_s:.2f} s, all {calls} after {cold.all_images_s:.2f} s")
    print(
        f"  requests sent before the first 503 came back: {cold.sends_before_first_503}; further requests "
        f"before ready: {cold.further_requests}; server counted {cold.server_requests_while_loading} "
        "requests while loading"
    )
    checks.append(
        (
            cold.first_image_s <= t + 1.5,
            f"first image <= T + 1.5 s = {t + 1.5:g} s: {cold.first_image_s:.2f} s",
        )
    )
    checks.append(
        (
            cold.further_requests <= 10,
            f"<= 10 further requests after the first 503 before ready: {cold.further_requests}",
        )
    )

    print()
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
