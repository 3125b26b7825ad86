"""A real local server of the text-to-image protocol that fails on purpose, for tests.

```python
from sdclient.testing import InferenceTestServer, Reply

with InferenceTestServer() as server:
    server.enqueue(Reply.loading(2.0), Reply.rate_limited(retry_after=1), Reply.image())
    ...  # point a client at server.model_url("user/model")
    assert [r.reply for r in server.requests] == ["loading", "rate_limited", "image"]
```

`FakeRouter` stands in for Hugging Face's router, the Hub's provider mapping and the providers
(fal-ai's queue, Replicate's predictions, WaveSpeed, the base64 providers), with an image host of
its own.

It also runs as a process (`python -m sdclient.testing --port 0`, or `spawn_server()` from
Python), for benchmarks and services under test that need their own process.

This package depends on the standard library, Pillow and `sdclient.protocol`.
"""

from ._replies import ImageFormat, ReceivedRequest, Reply, ReplyKind
from ._router import FakeRouter, JobScript, RoutedRequest
from ._server import InferenceTestServer
from ._spawn import spawn_server

__all__ = [
    "FakeRouter",
    "ImageFormat",
    "InferenceTestServer",
    "JobScript",
    "ReceivedRequest",
    "Reply",
    "ReplyKind",
    "RoutedRequest",
    "spawn_server",
]
