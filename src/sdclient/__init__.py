"""sdclient: a typed async client for text-to-image models served by the Hugging Face protocol.

```python
import sdclient

async with sdclient.SDClient("user/sd-model") as client:
    image = await client.generate("a red fox in the snow", seed=42)
    image.save("fox.png")
```

For scripts and notebooks: ``sdclient.generate_sync("a red fox", model="user/sd-model")`` or
``SyncSDClient``. The command line is ``sdclient generate ...`` / ``sdclient usage``.
"""

from ._client import EventHook, SDClient
from ._constants import DEFAULT_BASE_URL, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    EndpointGone,
    InsufficientCredits,
    InvalidImage,
    InvalidRequest,
    ModelLoadingTimeout,
    ModelNotFound,
    PermissionDenied,
    RateLimited,
    SDClientError,
    ServerError,
    UsageLimitExceeded,
)
from ._models import GeneratedImage, GenerateRequest, GenerationEvent, ModelStatus, Timings
from ._sync import SyncSDClient, generate_sync
from ._usage import ModelUsage, UsageSnapshot, UsageTracker, UsageWarning
from ._version import __version__

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "EndpointGone",
    "EventHook",
    "GenerateRequest",
    "GeneratedImage",
    "GenerationEvent",
    "InsufficientCredits",
    "InvalidImage",
    "InvalidRequest",
    "ModelLoadingTimeout",
    "ModelNotFound",
    "ModelStatus",
    "ModelUsage",
    "PermissionDenied",
    "RateLimited",
    "SDClient",
    "SDClientError",
    "ServerError",
    "SyncSDClient",
    "Timings",
    "UsageLimitExceeded",
    "UsageSnapshot",
    "UsageTracker",
    "UsageWarning",
    "__version__",
    "generate_sync",
]
