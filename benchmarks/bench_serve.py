"""What `sdtrain serve` costs on top of the pipeline, with the tiny pipeline so its share shows.

Start-up time to a 200 on /health, then 20 sequential requests (latency, and overhead = latency -
x-compute-time), then a burst of 8 concurrent requests while /health is polled (the event loop must
stay responsive while the worker thread generates).

Run: `.venv/bin/python benchmarks/bench_serve.py /tmp/tiny-sd1` (builds the tiny model there first
if the folder is empty).
"""

import asyncio
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from trainer.serve import create_app
from trainer.tiny import build_tiny_pipeline

torch.set_num_threads(1)
model = Path(sys.argv[1])
if not (model / "model_index.json").exists():
    build_tiny_pipeline(model)
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
url = f"http://127.0.0.1:{sock.getsockname()[1]}"
server = uvicorn.Server(
    uvicorn.Config(create_app(model, model_id="bench/tiny", device="cpu"), log_level="warning")
)
threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
start = time.perf_counter()
while True:
    try:
        if httpx.get(f"{url}/health").status_code == 200:
            break
    except httpx.ConnectError:
        pass
    time.sleep(0.02)
print(f"ready after {time.perf_counter() - start:.1f} s")
body = {"inputs": "a photo of sks toy", "parameters": {"num_inference_steps": 2, "seed": 1}}
totals, overheads = [], []
with httpx.Client(timeout=60) as client:
    client.post(f"{url}/", json=body)  # warm-up
    for _ in range(20):
        t = time.perf_counter()
        r = client.post(f"{url}/", json=body)
        total = time.perf_counter() - t
        totals.append(total)
        overheads.append(total - float(r.headers["x-compute-time"]))
print(
    f"latency median {statistics.median(totals) * 1e3:.0f} ms, overhead median "
    f"{statistics.median(overheads) * 1e3:.1f} ms, p90 {sorted(overheads)[17] * 1e3:.1f} ms"
)


async def burst(n: int) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        health, done = [], asyncio.Event()

        async def poll() -> None:
            while not done.is_set():
                t = time.perf_counter()
                await client.get(f"{url}/health")
                health.append(time.perf_counter() - t)
                await asyncio.sleep(0.05)

        poller, t = asyncio.create_task(poll()), time.perf_counter()
        replies = await asyncio.gather(*(client.post(f"{url}/", json=body) for _ in range(n)))
        done.set()
        await poller
        compute = sum(float(r.headers["x-compute-time"]) for r in replies)
        print(
            f"burst of {n}: {sorted({r.status_code for r in replies})}, "
            f"wall {time.perf_counter() - t:.2f} s, "
            f"compute {compute:.2f} s, /health median {statistics.median(health) * 1e3:.1f} ms, "
            f"max {max(health) * 1e3:.1f} ms"
        )


asyncio.run(burst(8))
server.should_exit = True
