"""A real local server of the text-to-image protocol that fails on purpose, for tests.

```python
from sdclient.testing import InferenceTestServer, Reply

with InferenceTestServer() as server:
    server.enqueue(Reply.loading(2.0), Reply.rate_limited(retry_after=1), Reply.image())
    ...  # point a client at server.model_url("user/model")
    assert [r.reply for r in server.requests] == ["loading", "rate_limited", "image"]
```

It also runs as a process (`python -m sdclient.testing --port 0`, or `spawn_server()` from
Python), for benchmarks and services under test that need their own process.

This package depends only on the standard library and Pillow.
"""

from ._replies import ImageFormat, ReceivedRequest, Reply, ReplyKind
from ._server import InferenceTestServer
from ._spawn import spawn_server

__all__ = [
    "ImageFormat",
    "InferenceTestServer",
    "ReceivedRequest",
    "Reply",
    "ReplyKind",
    "spawn_server",
]
