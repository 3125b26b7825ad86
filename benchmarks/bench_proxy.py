"""What the proxy costs, and how it holds up when the model is slow.

1. Overhead: an instant upstream (`python -m sdclient.testing`, a ~50 KB JPEG per request) called
   directly and through `sdproxy serve` (one uvicorn worker, its own process), 32 concurrent
   clients, in the same run. Targets: added p50 latency <= 3 ms, throughput >= 0.5x direct.
   Beside them: sdproxy with the opt-in `SDPROXY_HTTP_BACKEND=aiohttp`, and the floor:
   `_floor_proxy.py`, a bare ASGI forwarder on the same stack (uvicorn + one httpx or aiohttp client,
   nothing else), so that what sdproxy costs beyond any Python proxy shows.
2. Overload: an upstream that takes 5 s per image and 1,000 concurrent clients. Targets: the
   proxy's memory (RSS, psutil) stays under 300 MB, and requests beyond its queue are refused
   (503 `busy`) in under 50 ms.

The load generator is a minimal keep-alive HTTP/1.1 client on asyncio streams rather than httpx:
httpx spends about a millisecond of CPU per request, which on a small machine would be measured
as much as the proxy. Load generator, upstream and proxy still share the machine's cores: on a
2-core machine every figure includes that competition.

3. Stores (`--store both`): sdproxy with its in-process store and with Redis (a local
   `redis-server`), beside the floor, with 1 and 4 workers, and two instances sharing one Redis.
   Target: the Redis store adds <= 1 ms to the p50 of one request on loopback.

Run: `.venv/bin/python benchmarks/bench_proxy.py [--quick] [--store memory|redis|both]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil

from sdclient.testing import spawn_server

BIN = Path(sys.executable).parent
MODEL_ID = "bench/model"
SIZE = 480  # a JPEG of about 50 KB from the test server
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


# -- a lean HTTP/1.1 client --------------------------------------------------------------------


class Connection:
    """One keep-alive connection that sends prepared requests and reads whole answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    def close(self) -> None:
        self.writer.close()


def post(host: str, port: int, path: str, body: dict[str, object]) -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: image/*\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


def get(host: str, port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


@dataclass
class Load:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    bytes: int = 0
    elapsed_s: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.elapsed_s

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def closed_loop(
    url: str, path: str, bodies: list[dict[str, object]], *, requests: int, concurrency: int
) -> Load:
    """`concurrency` clients on their own connection, each sending its next request (the next of
    `bodies`, in turn) as soon as the previous answer is read, until `requests` were answered."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    raws = [post(host, port, path, body) for body in bodies]
    load = Load()
    left = requests

    async def client() -> None:
        nonlocal left
        connection = await Connection.open(host, port)
        try:
            while left > 0:
                left -= 1
                raw = raws[left % len(raws)]
                started = time.perf_counter()
                status, content = await connection.send(raw)
                load.latencies_ms.append((time.perf_counter() - started) * 1000)
                load.statuses[status] = load.statuses.get(status, 0) + 1
                load.bytes += len(content)
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    load.elapsed_s = time.perf_counter() - started
    return load


# -- processes ----------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


STORE_SETTINGS: dict[str, object] = {}
"""Extra settings of every sdproxy of the overhead and overload scenarios (`--store redis`)."""


@contextmanager
def sdproxy(upstream: str, *, workers: int = 1, **settings: object) -> Iterator[tuple[str, psutil.Process]]:
    """`sdproxy serve` in front of `upstream`; yields its URL and its (main) process."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDPROXY_") and k != "HF_TOKEN"}
    env["SDPROXY_MODEL"] = f"{upstream}/models/{MODEL_ID}"
    env.update({f"SDPROXY_{k.upper()}": str(v) for k, v in {**STORE_SETTINGS, **settings}.items()})
    command = [str(BIN / "sdproxy"), "serve", "--port", str(port), "--workers", str(workers)]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"sdproxy exited: {log.read().decode()[-2000:]}")
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("sdproxy did not start")
                time.sleep(0.1)
            yield url, psutil.Process(process.pid)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


@contextmanager
def redis_server() -> Iterator[str]:
    """A `redis-server` on a free loopback port, no persistence; yields its URL."""
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    command = [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                import socket

                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def floor_proxy(upstream: str, client: str, workers: int = 1) -> Iterator[tuple[str, psutil.Process]]:
    """`_floor_proxy.py` under uvicorn (one worker) sending with `client` (`aiohttp` or `httpx`);
    yields its URL and its process."""
    port = _free_port()
    env = {**os.environ, "FLOOR_UPSTREAM": f"{upstream}/models/{MODEL_ID}", "FLOOR_CLIENT": client}
    command = [sys.executable, "-m", "uvicorn", "_floor_proxy:app", "--app-dir", str(Path(__file__).parent)]
    command += ["--port", str(port), "--no-access-log", "--log-level", "warning", "--workers", str(workers)]
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the floor proxy did not start")
            time.sleep(0.1)
        yield url, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(10)


# -- the two scenarios --------------------------------------------------------------------------


@dataclass
class Target:
    """One way of reaching the upstream, measured in turns with the others."""

    name: str
    url: str
    path: str
    bodies: list[dict[str, object]]
    process: psutil.Process | None = None  # the proxy's, for its CPU time
    load: Load = field(default_factory=Load)
    cpu_s: float = 0.0
    alone_p50: float = 0.0


def overhead(requests: int, concurrency: int) -> bool:
    print(f"\n== Overhead: instant upstream, {SIZE}x{SIZE} JPEG, {concurrency} concurrent clients ==")
    with spawn_server(format="jpeg") as upstream:
        # Limits off, a queue that never refuses: only the proxy's own cost is measured.
        settings: dict[str, object] = {
            "rate_limit_per_minute": 0,
            "daily_quota": 0,
            "max_concurrency": concurrency,
            "queue_size": 1000,
            "cache_max_bytes": 0,
        }
        with (
            sdproxy(upstream, **settings) as (proxy, process),
            sdproxy(upstream, **settings, http_backend="aiohttp") as (proxy_aiohttp, process_aiohttp),
            floor_proxy(upstream, "httpx") as (floor_httpx, floor_httpx_process),
            floor_proxy(upstream, "aiohttp") as (floor_aiohttp, floor_aiohttp_process),
        ):
            # The proxy's client sends a fresh random seed with every request; the direct calls do
            # too, so that the upstream does the same work either way.
            rng = random.Random(0)
            direct_body: list[dict[str, object]] = [
                {
                    "inputs": PROMPT,
                    "parameters": {"width": SIZE, "height": SIZE, "seed": rng.randrange(2**32)},
                }
                for _ in range(4096)  # distinct seeds, as the proxy's random ones
            ]
            proxy_body: list[dict[str, object]] = [{"prompt": PROMPT, "width": SIZE, "height": SIZE}]
            targets = [
                Target("direct", upstream, f"/models/{MODEL_ID}", direct_body),
                Target("sdproxy", proxy, "/generate", proxy_body, process),
                Target("sdproxy (aiohttp backend)", proxy_aiohttp, "/generate", proxy_body, process_aiohttp),
                Target("floor (httpx)", floor_httpx, "/generate", proxy_body, floor_httpx_process),
                Target("floor (aiohttp)", floor_aiohttp, "/generate", proxy_body, floor_aiohttp_process),
            ]

            def run(target: Target, n: int, clients: int = concurrency) -> Load:
                return asyncio.run(
                    closed_loop(target.url, target.path, target.bodies, requests=n, concurrency=clients)
                )

            for target in targets:  # warm up
                run(target, concurrency * 2)
            # One client at a time: the latency a proxy adds when it is not saturated.
            for target in targets:
                target.alone_p50 = run(target, min(200, requests // 4), clients=1).pct(50)
            # Alternate halves so that a change in the machine's load hits every side alike.
            for _ in range(2):
                for target in targets:
                    before = target.process.cpu_times() if target.process else None
                    part = run(target, requests // 2)
                    if target.process and before:
                        after = target.process.cpu_times()
                        target.cpu_s += after.user + after.system - before.user - before.system
                    load = target.load
                    load.latencies_ms += part.latencies_ms
                    load.elapsed_s += part.elapsed_s
                    load.bytes += part.bytes
                    for status, count in part.statuses.items():
                        load.statuses[status] = load.statuses.get(status, 0) + count

    direct = targets[0]
    print(
        f"{'':24} {'req/s':>7} {'x direct':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU ms/req':>10}"
        f" {'p50 alone':>9}  statuses"
    )
    for target in targets:
        load = target.load
        cpu = f"{target.cpu_s / len(load.latencies_ms) * 1000:10.2f}" if target.process else f"{'':10}"
        print(
            f"{target.name:24} {load.throughput:7.0f} {load.throughput / direct.load.throughput:7.2f}x"
            f" {load.pct(50):8.2f} {load.pct(99):8.2f} {cpu} {target.alone_p50:9.2f}  {load.statuses}"
        )
    sd, sd_aiohttp, bare_httpx = targets[1], targets[2], targets[3]
    print(f"one client at a time: sdproxy adds {sd.alone_p50 - direct.alone_p50:.2f} ms to the direct p50")
    print(
        f"sdproxy (httpx, the default): {sd.load.throughput / bare_httpx.load.throughput:.2f}x the httpx "
        f"floor's throughput; the aiohttp backend: {sd_aiohttp.load.throughput / sd.load.throughput:.2f}x "
        "the default's"
    )
    added = sd.load.pct(50) - direct.load.pct(50)
    ratio = sd.load.throughput / direct.load.throughput
    ok_latency, ok_throughput = added <= 3.0, ratio >= 0.5
    ok_statuses = all(set(target.load.statuses) == {200} for target in targets)
    verdict = "PASS" if ok_latency else "FAIL"
    print(f"added p50 at {concurrency} clients: {added:.2f} ms (target <= 3 ms)  {verdict}")
    print(f"throughput: {ratio:.2f}x direct (target >= 0.5x)  {'PASS' if ok_throughput else 'FAIL'}")
    if not ok_statuses:
        print("FAIL: some answers were not 200")
    return ok_latency and ok_throughput and ok_statuses


async def split_loop(
    urls: list[str], path: str, bodies: list[dict[str, object]], *, requests: int, concurrency: int
) -> Load:
    """`closed_loop` with the clients spread evenly over `urls` (instances of one deployment)."""
    parts = await asyncio.gather(
        *(
            closed_loop(
                url, path, bodies, requests=requests // len(urls), concurrency=concurrency // len(urls)
            )
            for url in urls
        )
    )
    load = Load(elapsed_s=max(part.elapsed_s for part in parts))
    for part in parts:
        load.latencies_ms += part.latencies_ms
        load.bytes += part.bytes
        for status, count in part.statuses.items():
            load.statuses[status] = load.statuses.get(status, 0) + count
    return load


def store_costs(requests: int, concurrency: int) -> bool:
    """sdproxy with its in-process store and with Redis, beside the floor forwarder: 1 and 4
    workers, and two instances (one worker each) sharing one Redis."""
    print(f"\n== Stores: instant upstream, {SIZE}x{SIZE} JPEG, {concurrency} concurrent clients ==")
    # Limits on (but never reached) so that each request runs the store's admission as in use:
    # one token-bucket and one daily-quota check and take, then the delivered-image count.
    settings: dict[str, object] = {
        "rate_limit_per_minute": 10**9,
        "rate_limit_burst": 10**9,
        "daily_quota": 10**9,
        "max_concurrency": concurrency,
        "queue_size": 1000,
        "cache_max_bytes": 0,
    }
    body: list[dict[str, object]] = [{"prompt": PROMPT, "width": SIZE, "height": SIZE}]
    rows: list[tuple[str, Load, float]] = []
    with spawn_server(format="jpeg") as upstream, redis_server() as redis_url:
        redis = {"redis_url": redis_url}
        with (
            floor_proxy(upstream, "httpx") as (floor, _),
            floor_proxy(upstream, "httpx", workers=4) as (floor_4, _),
            sdproxy(upstream, **settings) as (memory_1, _),
            sdproxy(upstream, **settings, **redis) as (redis_1, _),
            sdproxy(upstream, workers=4, **settings) as (memory_4, _),
            sdproxy(upstream, workers=4, **settings, **redis) as (redis_4, _),
            sdproxy(upstream, **settings, **redis, redis_prefix="pair:") as (pair_a, _),
            sdproxy(upstream, **settings, **redis, redis_prefix="pair:") as (pair_b, _),
        ):
            targets = [
                ("floor (httpx), 1 worker", [floor]),
                ("sdproxy memory, 1 worker", [memory_1]),
                ("sdproxy redis, 1 worker", [redis_1]),
                ("floor (httpx), 4 workers", [floor_4]),
                ("sdproxy memory, 4 workers", [memory_4]),
                ("sdproxy redis, 4 workers", [redis_4]),
                ("sdproxy redis, 2 instances", [pair_a, pair_b]),
            ]

            def run(urls: list[str], n: int, clients: int) -> Load:
                return asyncio.run(split_loop(urls, "/generate", body, requests=n, concurrency=clients))

            for _, urls in targets:  # warm up every worker's connections
                run(urls, concurrency * 4, concurrency)
            alone = {name: run(urls[:1], min(300, requests // 4), 1).pct(50) for name, urls in targets}
            loads = {name: Load() for name, _ in targets}
            for _ in range(2):  # halves alternated, as in the overhead scenario
                for name, urls in targets:
                    part = run(urls, requests // 2, concurrency)
                    load = loads[name]
                    load.latencies_ms += part.latencies_ms
                    load.elapsed_s += part.elapsed_s
                    for status, count in part.statuses.items():
                        load.statuses[status] = load.statuses.get(status, 0) + count
            rows = [(name, loads[name], alone[name]) for name, _ in targets]
    print(f"{'':28} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'p50 alone':>9}  statuses")
    for name, load, alone_p50 in rows:
        print(
            f"{name:28} {load.throughput:7.0f} {load.pct(50):8.2f} {load.pct(99):8.2f} {alone_p50:9.2f}"
            f"  {load.statuses}"
        )
    by_name = {name: (load, alone_p50) for name, load, alone_p50 in rows}
    added_alone = by_name["sdproxy redis, 1 worker"][1] - by_name["sdproxy memory, 1 worker"][1]
    added_loaded = by_name["sdproxy redis, 1 worker"][0].pct(50) - by_name["sdproxy memory, 1 worker"][0].pct(
        50
    )
    ok = added_alone <= 1.0
    print(
        f"Redis store vs in-process, 1 worker, one client at a time: {added_alone:+.2f} ms p50 "
        f"(target <= 1 ms)  {'PASS' if ok else 'FAIL'}"
    )
    print(f"Redis store vs in-process, 1 worker, {concurrency} clients: {added_loaded:+.2f} ms p50")
    ok_statuses = all(set(load.statuses) == {200} for _, load, _ in rows)
    if not ok_statuses:
        print("FAIL: some answers were not 200")
    return ok and ok_statuses


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    if not ordered:
        return float("nan"), float("nan"), float("nan")
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], ordered[-1]


def overload(clients: int, delay: float) -> bool:
    concurrency, queue = 50, 50
    admitted = concurrency + queue
    print(f"\n== Overload: {delay:g} s upstream, {clients} concurrent clients ==")
    print(
        f"proxy: max_concurrency={concurrency}, queue_size={queue}: {admitted} are let in, the rest refused"
    )
    with spawn_server(format="jpeg", delay=delay) as upstream:
        settings = {
            "rate_limit_per_minute": 0,
            "daily_quota": 0,
            "max_concurrency": concurrency,
            "queue_size": queue,
            "upstream_timeout": delay * 4,
            # Every client holds its connection open from the start: all of them must fit under
            # the connection cap (uvicorn's limit_concurrency, 1000 by default), so that every
            # refusal measured is the proxy's `busy`.
            "max_connections": clients + 100,
        }
        with sdproxy(upstream, **settings) as (proxy, process):
            parts = urlsplit(proxy)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            raw = post(host, port, "/generate", {"prompt": PROMPT, "width": 64, "height": 64})
            idle_rss = process.memory_info().rss
            peak_rss = idle_rss
            statuses: dict[int, int] = {}
            spread_ms: list[float] = []
            burst_ms: list[float] = []

            async def request(
                connection: Connection, latencies: list[float] | None, start_in: float = 0
            ) -> None:
                await asyncio.sleep(start_in)
                started = time.perf_counter()
                status, _ = await connection.send(raw)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 503 and latencies is not None:
                    latencies.append((time.perf_counter() - started) * 1000)

            async def scenario() -> float:
                nonlocal peak_rss

                async def sample() -> None:
                    nonlocal peak_rss
                    while True:
                        peak_rss = max(peak_rss, process.memory_info().rss)
                        await asyncio.sleep(0.05)

                sampler = asyncio.create_task(sample())
                # Every client opens its connection first.
                connections = await asyncio.gather(*(Connection.open(host, port) for _ in range(clients)))
                for connection in connections:
                    await connection.send(get(host, port, "/healthz"))
                started = time.perf_counter()
                # 1. The first clients fill every slot and the whole queue (they wait for the model).
                held = [asyncio.create_task(request(c, None)) for c in connections[:admitted]]
                await asyncio.sleep(0.5)
                rest = connections[admitted:]
                half = len(rest) // 2
                # 2. Half of the others arrive over one second (about a thousand requests a second)...
                spread = [request(c, spread_ms, start_in=i / half) for i, c in enumerate(rest[:half])]
                await asyncio.gather(*spread)
                # 3. ...then the other half all at once, a burst on one event loop.
                await asyncio.gather(*(request(c, burst_ms) for c in rest[half:]))
                await asyncio.gather(*held)
                sampler.cancel()
                for connection in connections:
                    connection.close()
                return time.perf_counter() - started

            elapsed = asyncio.run(scenario())
    refused = len(spread_ms) + len(burst_ms)
    s50, s99, smax = _quantiles(spread_ms)
    b50, b99, bmax = _quantiles(burst_ms)
    print(f"answers after {elapsed:.1f} s: {statuses}")
    print(f"  {statuses.get(200, 0)} images, {refused} refused with 503 busy")
    print(f"refusals arriving over 1 s ({len(spread_ms)}): p50 {s50:.1f}, p99 {s99:.1f}, max {smax:.1f} ms")
    print(f"refusals all at once ({len(burst_ms)}): p50 {b50:.1f}, p99 {b99:.1f}, max {bmax:.1f} ms")
    each = bmax / max(1, len(burst_ms))
    print(f"  (one event loop answers a burst one request after another: {each:.2f} ms each)")
    print(f"proxy RSS: {idle_rss / 2**20:.0f} MB idle, {peak_rss / 2**20:.0f} MB peak")
    ok_rss = peak_rss < 300 * 2**20
    ok_refusal = bool(spread_ms) and s99 < 50
    ok_split = statuses.get(200, 0) == admitted and refused == clients - admitted
    print(f"peak RSS < 300 MB  {'PASS' if ok_rss else 'FAIL'}")
    print(f"refused in < 50 ms (p99, arriving over 1 s)  {'PASS' if ok_refusal else 'FAIL'}")
    print(f"exactly max_concurrency + queue_size served, the rest refused  {'PASS' if ok_split else 'FAIL'}")
    return ok_rss and ok_refusal and ok_split


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and clients (about 20 s)")
    parser.add_argument(
        "--store",
        choices=["memory", "redis", "both"],
        default="memory",
        help="memory: the overhead and overload scenarios with the in-process store (the default); "
        "redis: the same with sdproxy on a local redis-server; both: only the store comparison "
        "(in-process and Redis beside the floor, 1 and 4 workers, 2 instances on one Redis)",
    )
    parser.add_argument(
        "--requests", type=int, help="requests per target in the overhead and stores scenarios"
    )
    args = parser.parse_args()
    requests, clients, delay = (400, 300, 2.0) if args.quick else (4000, 1000, 5.0)
    requests = args.requests or requests
    print(f"machine: {os.cpu_count()} CPU cores, shared by the load generator, the upstream and the proxy")
    if args.store == "both":
        ok = store_costs(requests, concurrency=32)
        print("\nALL PASS" if ok else "\nSOME FAIL")
        return 0 if ok else 1
    if args.store == "redis":
        with redis_server() as url:
            STORE_SETTINGS["redis_url"] = url
            ok = overhead(requests, concurrency=32)
            ok = overload(clients, delay) and ok
    else:
        ok = overhead(requests, concurrency=32)
        ok = overload(clients, delay) and ok
    print("\nALL PASS" if ok else "\nSOME FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
