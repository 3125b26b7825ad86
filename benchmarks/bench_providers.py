"""Benchmark time to image through queue-based providers, SDClient beside AsyncInferenceClient.

Both clients call one `FakeRouter` (`sdclient.testing`) running in this process, whose providers
hold every job in their queue for Q seconds of real wall time (`--queue-s`), then finish at once:

  - wavespeed: both clients submit, then poll the task's result URL until it is completed;
  - fal-ai: SDClient submits to fal-ai's queue and polls its status URL; huggingface_hub sends
    fal-ai text-to-image to the synchronous route, which the fake holds open for the Q seconds
    (as `fal.run` does), so it sends no polls.

Jobs run one at a time; within a round the two clients take turns going first. Time to image is
measured from the call to the decoded image; polls are the status requests the fake counted for
the job. Both clients poll every 0.5 s (SDClient's `RetryPolicy.poll_interval` default,
huggingface_hub's `_POLLING_INTERVAL`).

Targets (SDClient; PASS/FAIL printed, exit status 1 if any fails):
  - time to image <= Q + one polling interval + 0.5 s;
  - polling requests per job <= Q / interval + 2.

Usage:
    python benchmarks/bench_providers.py                 # Q = 10 s, 3 rounds (about 2.5 minutes)
    python benchmarks/bench_providers.py --queue-s 1     # quick
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from huggingface_hub import AsyncInferenceClient

from sdclient import RetryPolicy, SDClient
from sdclient.testing import FakeRouter, JobScript

PROMPT = "portrait of abraza man as a peaky blinders character"
TOKEN = "hf_" + "benchmark0123456789"  # an `hf_` token: huggingface_hub then calls the router
MODELS = {
    "wavespeed": ("bench/flux-wavespeed", "wavespeed-ai/flux-dev"),
    "fal-ai": ("bench/flux-fal", "fal-ai/flux/dev"),
}
SIDE = 512
SEED = 1234  # the same image for both clients: the fake encodes each new one (tens of ms for a PNG)


@dataclass
class Runs:
    """One client's figures at one provider, one entry per job."""

    seconds: list[float] = field(default_factory=list)
    polls: list[int] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"time to image median {statistics.median(self.seconds):6.2f} s, max {max(self.seconds):6.2f} s;"
            f" polls per job max {max(self.polls):3d}"
        )


async def timed(
    router: FakeRouter, provider: str, queue_s: float, call: Callable[[], Awaitable[object]]
) -> tuple[float, int]:
    """(seconds to image, status polls) of one job queued for `queue_s`."""
    router.script(provider, JobScript(queue_s=queue_s))  # type: ignore[arg-type]
    start = time.perf_counter()
    await call()
    elapsed = time.perf_counter() - start
    return elapsed, router.job(router.jobs[-1])["polls"]


async def run(queue_s: float, rounds: int, providers: list[str]) -> dict[str, dict[str, Runs]]:
    """Figures per provider and client."""
    with FakeRouter() as router, router.patch_huggingface_hub():
        return {provider: await run_provider(router, provider, queue_s, rounds) for provider in providers}


async def run_provider(router: FakeRouter, provider: str, queue_s: float, rounds: int) -> dict[str, Runs]:
    model, provider_id = MODELS[provider]
    router.add_model(model, provider, provider_id)  # type: ignore[arg-type]
    async with (
        SDClient(
            model,
            provider=provider,  # type: ignore[arg-type]
            token=TOKEN,
            router_url=router.url,
            hub_url=router.url,
            max_wait_for_model=queue_s + 60,
        ) as sd,
        AsyncInferenceClient(provider=provider, api_key=TOKEN, timeout=queue_s + 60) as hf,  # type: ignore[arg-type]
    ):

        async def sdclient_call() -> object:
            return await sd.generate(PROMPT, width=SIDE, height=SIDE, seed=SEED)

        async def hf_call() -> object:
            return await hf.text_to_image(PROMPT, model=model, width=SIDE, height=SIDE, seed=SEED)

        calls = {"sdclient": sdclient_call, "hf_async": hf_call}
        for call in calls.values():  # warm up: the Hub's mapping, connections
            await timed(router, provider, 0.0, call)
        runs = {name: Runs() for name in calls}
        for round_ in range(rounds):
            names = list(calls) if round_ % 2 == 0 else list(reversed(calls))
            for name in names:
                seconds, polls = await timed(router, provider, queue_s, calls[name])
                runs[name].seconds.append(seconds)
                runs[name].polls.append(polls)
                print(f"  {provider:>9} {name:>8}: {seconds:6.2f} s, {polls:3d} polls", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue-s", type=float, default=10.0, help="seconds each job waits in the queue")
    parser.add_argument("--rounds", type=int, default=3, help="jobs per client and provider")
    parser.add_argument(
        "--providers", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}"
    )
    args = parser.parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = sorted(set(providers) - set(MODELS))
    if unknown or args.queue_s < 0 or args.rounds < 1:
        parser.error(f"unknown providers {unknown}" if unknown else "--queue-s >= 0 and --rounds >= 1")
    q = args.queue_s
    interval = RetryPolicy().poll_interval
    print(f"FakeRouter in this process; queue Q = {q:g} s of wall time, run 0 s; {args.rounds} rounds")
    results = asyncio.run(run(q, args.rounds, providers))

    checks: list[tuple[bool, str]] = []
    print()
    for provider, runs in results.items():
        sd, hf = runs["sdclient"], runs["hf_async"]
        ratio = statistics.median(sd.seconds) / statistics.median(hf.seconds)
        print(f"{provider}:")
        print(f"  SDClient             {sd.line()}")
        print(f"  AsyncInferenceClient {hf.line()}")
        print(f"  SDClient / AsyncInferenceClient time to image (medians): {ratio:.3f}x")
        bound = q + interval + 0.5
        checks.append(
            (
                max(sd.seconds) <= bound,
                f"{provider}: time to image <= Q + {interval:g} + 0.5 = {bound:g} s: {max(sd.seconds):.2f} s",
            )
        )
        poll_bound = q / interval + 2
        checks.append(
            (
                max(sd.polls) <= poll_bound,
                f"{provider}: polls per job <= Q / {interval:g} + 2 = {poll_bound:g}: {max(sd.polls)}",
            )
        )
    print()
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
