"""sdclient: a typed async client for text-to-image models on Hugging Face's Inference Providers,
dedicated Inference Endpoints and any server of the hf-inference protocol.

```python
import sdclient

async with sdclient.SDClient("user/sd-model") as client:  # provider="auto": the Hub says who serves it
    image = await client.generate("a red fox in the snow", seed=42)
    image.save("fox.png")
```

For scripts and notebooks: ``sdclient.generate_sync("a red fox", model="user/sd-model")`` or
``SyncSDClient``. The command line is ``sdclient generate ...`` / ``sdclient usage``. The wire
protocol (request models and bounds, headers, bodies, host and token rules) is :mod:`sdclient.protocol`.
"""

from . import protocol
from ._client import Clock, EventHook, SDClient
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
    JobFailed,
    JobTimeout,
    ModelLoadingTimeout,
    ModelNotFound,
    PermissionDenied,
    ProviderNotAvailable,
    RateLimited,
    SDClientError,
    ServerError,
    UsageLimitExceeded,
)
from ._models import GeneratedImage, GenerateRequest, GenerationEvent, ModelStatus, Timings
from ._providers import ProviderMapping, ProviderName, Route
from ._retry import RetryPolicy
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
    "Clock",
    "EndpointGone",
    "EventHook",
    "GenerateRequest",
    "GeneratedImage",
    "GenerationEvent",
    "InsufficientCredits",
    "InvalidImage",
    "InvalidRequest",
    "JobFailed",
    "JobTimeout",
    "ModelLoadingTimeout",
    "ModelNotFound",
    "ModelStatus",
    "ModelUsage",
    "PermissionDenied",
    "ProviderMapping",
    "ProviderName",
    "ProviderNotAvailable",
    "RateLimited",
    "RetryPolicy",
    "Route",
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
    "protocol",
]
