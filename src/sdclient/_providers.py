"""Inference Providers: one small adapter per provider behind Hugging Face's router.

An adapter builds the request (route, payload names, LoRA path, headers) and reads the answers
(raw bytes, base64, an image URL to fetch, or a job to poll). What is common to all of them
(retries, 429/402/5xx, cold starts, polling, usage, typed errors) lives in :class:`SDClient`.
huggingface_hub's ``inference/_providers/<provider>.py`` is the reference of every shape here.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from .protocol import HUB_ENDPOINT, GenerateRequest

__all__ = [
    "PROVIDERS",
    "Failed",
    "ImageBytes",
    "ImageUrl",
    "Job",
    "Pending",
    "Provider",
    "ProviderMapping",
    "Route",
    "parse_mapping",
]


@dataclass(frozen=True, slots=True)
class ProviderMapping:
    """One entry of a model's ``inferenceProviderMapping`` on the Hub."""

    provider: str
    """The provider's name (``fal-ai``, ``replicate``, ...)."""
    provider_id: str
    """The model's id on the provider's side."""
    status: str = "live"
    """``live``, ``staging`` or ``error``."""
    task: str = "text-to-image"
    """The task the provider serves the model for."""
    adapter: str | None = None
    """``lora`` for a LoRA adapter served on its base model."""
    adapter_weights_path: str | None = None
    """The adapter's weights file in the Hub repo."""


def parse_mapping(value: Any) -> list[ProviderMapping]:
    """The Hub's ``inferenceProviderMapping`` (a dict by provider, or a list) as mappings, in order.

    Args:
        value: The field of ``GET /api/models/{id}?expand[]=inferenceProviderMapping``, or the
            list huggingface_hub's ``ModelInfo.inference_provider_mapping`` holds.

    Returns:
        One :class:`ProviderMapping` per entry, in the Hub's order.
    """
    if value is None:
        return []
    items: list[tuple[str | None, Any]]
    if isinstance(value, dict):
        items = list(value.items())
    else:
        items = [(None, entry) for entry in value]
    mappings = []
    for provider, entry in items:
        if not isinstance(entry, dict):  # a huggingface_hub InferenceProviderMapping
            entry = {
                "provider": entry.provider,
                "providerId": entry.provider_id,
                "status": entry.status,
                "task": entry.task,
                "adapter": entry.adapter,
                "adapterWeightsPath": entry.adapter_weights_path,
            }
        mappings.append(
            ProviderMapping(
                provider=str(provider or entry.get("provider")),
                provider_id=str(entry.get("providerId")),
                status=str(entry.get("status", "live")),
                task=str(entry.get("task", "text-to-image")),
                adapter=entry.get("adapter"),
                adapter_weights_path=entry.get("adapterWeightsPath"),
            )
        )
    return mappings


@dataclass(frozen=True, slots=True)
class Route:
    """Where one model's calls go (``SDClient.route``); it never holds the token."""

    provider: str
    """``hf-inference``, ``fal-ai``, ``replicate``, ..., or ``endpoint`` for a URL given as the model."""
    model: str
    """The Hub model id or URL given to the client."""
    provider_model: str
    """The model's id on the provider's side (the URL itself for an endpoint)."""
    url: str
    """Where the request is POSTed."""
    adapter_weights_path: str | None = None
    """A LoRA adapter's weights file (in the Hub repo ``model``), sent to the provider as a URL."""

    @property
    def usage_key(self) -> str:
        """The key usage is counted under: the model, prefixed by the provider when it is not the
        protocol's own route (``fal-ai:user/flux-lora``)."""
        if self.provider in ("hf-inference", "endpoint"):
            return self.model
        return f"{self.provider}:{self.model}"


# -- what an answer turns into ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageBytes:
    """The image itself."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ImageUrl:
    """An image to fetch (without the token unless it is a Hugging Face host)."""

    url: str


@dataclass(frozen=True, slots=True)
class Job:
    """A queued job to poll."""

    poll_url: str
    """GET this for the job's status."""
    result_url: str | None = None
    """GET this for the result once the status says done (``None``: the status answer has it)."""
    cancel_url: str | None = None
    """Where to cancel the job when the caller gives up (``None``: the provider cannot)."""
    cancel_method: Literal["POST", "PUT"] = "POST"


@dataclass(frozen=True, slots=True)
class Pending:
    """The job is still waiting or running."""

    state: Literal["queued", "generating"]
    position: int | None = None
    """Place in the provider's queue, where it says."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The provider ran the job and it failed (or was cancelled)."""

    message: str


Answer = ImageBytes | ImageUrl | Job | Failed
PollAnswer = ImageBytes | ImageUrl | Pending | Failed | None
"""``None``: done, fetch ``Job.result_url``."""


class ProviderError(ValueError):
    """A provider's answer had an unexpected shape."""


def _first(items: Any, what: str) -> Any:
    if not isinstance(items, list) or not items:
        raise ProviderError(f"expected a non-empty list of {what}, got {type(items).__name__}")
    return items[0]


def _b64(value: Any) -> ImageBytes:
    if not isinstance(value, str):
        raise ProviderError("expected the image as a base64 string")
    try:
        return ImageBytes(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ProviderError(f"the image is not valid base64 ({exc})") from None


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProviderError(f"expected a JSON object for {what}, got {type(value).__name__}")
    return value


# -- the adapters -------------------------------------------------------------------------------


class Provider:
    """Base of the adapters: the router base is ``{router}/{name}``."""

    name: ClassVar[str]
    json_answer: ClassVar[bool] = True
    """Whether the first answer is JSON (else it is the image)."""

    def url(self, router: str, mapping: ProviderMapping) -> str:
        """Where the request is POSTed."""
        return f"{router.rstrip('/')}/{self.name}{self.route(mapping.provider_id)}"

    def route(self, provider_model: str) -> str:
        """The path after the provider's router base."""
        return ""

    def headers(self) -> dict[str, str]:
        """Extra request headers."""
        return {}

    def payload(self, request: GenerateRequest, route: Route, hub: str) -> dict[str, Any]:
        """The JSON body."""
        raise NotImplementedError

    def answer(self, data: Any, route: Route, router: str) -> Answer:
        """What the first (JSON) answer means."""
        raise NotImplementedError

    def poll(self, data: Any) -> PollAnswer:
        """What a status answer means."""
        raise NotImplementedError

    def result(self, data: Any) -> ImageBytes | ImageUrl:
        """What the result answer (``Job.result_url``) means."""
        raise NotImplementedError

    @staticmethod
    def lora_url(route: Route, hub: str) -> str | None:
        """The Hub resolve URL of a LoRA adapter's weights, like huggingface_hub's
        ``HUGGINGFACE_CO_URL_TEMPLATE``."""
        if route.adapter_weights_path is None:
            return None
        return f"{hub.rstrip('/')}/{route.model}/resolve/main/{route.adapter_weights_path}"


def _flat_parameters(request: GenerateRequest) -> dict[str, Any]:
    """The parameters as huggingface_hub passes them to every provider (``scheduler`` included)."""
    return request.parameters()


class HFInference(Provider):
    """``hf-inference``: this protocol; the answer is the image."""

    name = "hf-inference"
    json_answer = False

    def route(self, provider_model: str) -> str:
        return f"/models/{provider_model}"

    def payload(self, request: GenerateRequest, route: Route, hub: str) -> dict[str, Any]:
        return request.to_payload()


class FalAI(Provider):
    """``fal-ai`` through its queue: submit, poll the status (with the queue position), fetch the
    result, then the image URL. LoRAs as ``loras: [{path, scale}]``; SDXL LoRAs on ``fal-ai/lora``
    name their base in ``model_name``."""

    name = "fal-ai"
    QUERY = "?_subdomain=queue"
    SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"

    def route(self, provider_model: str) -> str:
        return f"/{provider_model}{self.QUERY}"

    def payload(self, request: GenerateRequest, route: Route, hub: str) -> dict[str, Any]:
        payload: dict[str, Any] = {"prompt": request.prompt, **_flat_parameters(request)}
        if "width" in payload and "height" in payload:
            payload["image_size"] = {"width": payload.pop("width"), "height": payload.pop("height")}
        lora = self.lora_url(route, hub)
        if lora is not None:
            payload["loras"] = [{"path": lora, "scale": 1}]
            if route.provider_model == "fal-ai/lora":
                payload["model_name"] = self.SDXL_BASE
        return payload

    def answer(self, data: Any, route: Route, router: str) -> Answer:
        body = _dict(data, "fal-ai's answer")
        if "images" in body:
            return self.result(body)
        response_url = body.get("response_url")
        if not isinstance(response_url, str) or not body.get("request_id"):
            raise ProviderError("fal-ai answered without images, request_id or response_url")
        base = f"{router.rstrip('/')}/{self.name}{urlsplit(response_url).path}"
        return Job(
            poll_url=f"{base}/status{self.QUERY}",
            result_url=f"{base}{self.QUERY}",
            cancel_url=f"{base}/cancel{self.QUERY}",
            cancel_method="PUT",
        )

    def result(self, data: Any) -> ImageBytes | ImageUrl:
        image = _dict(_first(_dict(data, "fal-ai's result").get("images"), "images"), "an image")
        url = image.get("url")
        if not isinstance(url, str):
            raise ProviderError("fal-ai's image has no url")
        return ImageUrl(url)

    def poll(self, data: Any) -> PollAnswer:
        body = _dict(data, "fal-ai's status")
        status = body.get("status")
        if status == "COMPLETED":
            error = body.get("error")
            return Failed(str(error)) if error else None
        if status == "IN_QUEUE":
            position = body.get("queue_position")
            return Pending("queued", position if isinstance(position, int) else None)
        if status == "IN_PROGRESS":
            return Pending("generating")
        raise ProviderError(f"unknown fal-ai status {status!r}")


class Replicate(Provider):
    """``replicate``: a prediction, answered at once with ``Prefer: wait`` or polled; LoRAs as
    ``lora_weights``."""

    name = "replicate"

    def route(self, provider_model: str) -> str:
        if ":" in provider_model:
            return "/v1/predictions"
        return f"/v1/models/{provider_model}/predictions"

    def headers(self) -> dict[str, str]:
        return {"Prefer": "wait"}

    def payload(self, request: GenerateRequest, route: Route, hub: str) -> dict[str, Any]:
        payload: dict[str, Any] = {"input": {"prompt": request.prompt, **_flat_parameters(request)}}
        if ":" in route.provider_model:
            payload["version"] = route.provider_model.split(":", 1)[1]
        if route.adapter_weights_path is not None:
            # Replicate's LoRA models take a Hub repo as a ``huggingface.co/<owner>/<name>`` URL
            # (not a file URL), whatever Hub the client asks for mappings: as huggingface_hub does.
            payload["input"]["lora_weights"] = f"{HUB_ENDPOINT}/{route.model}"
        return payload

    def _prediction(self, body: dict[str, Any]) -> PollAnswer:
        status = body.get("status")
        if status == "succeeded":
            output = body.get("output")
            url = output if isinstance(output, str) else _first(output, "outputs")
            return ImageUrl(str(url))
        if status in ("failed", "canceled"):
            return Failed(str(body.get("error") or f"the prediction {status}"))
        if status == "starting":
            return Pending("queued")
        if status == "processing":
            return Pending("generating")
        raise ProviderError(f"unknown Replicate status {status!r}")

    def answer(self, data: Any, route: Route, router: str) -> Answer:
        body = _dict(data, "Replicate's prediction")
        state = self._prediction(body)
        if isinstance(state, ImageUrl | Failed):
            return state
        urls = _dict(body.get("urls"), "the prediction's urls")
        return Job(
            poll_url=self._routed(urls["get"], router), cancel_url=self._routed(urls.get("cancel"), router)
        )

    def _routed(self, url: Any, router: str) -> str:
        """Replicate's own ``api.replicate.com`` URLs, sent through the router like the first call."""
        if not isinstance(url, str):
            return ""
        return f"{router.rstrip('/')}/{self.name}{urlsplit(url).path}"

    def poll(self, data: Any) -> PollAnswer:
        return self._prediction(_dict(data, "Replicate's prediction"))


class WaveSpeed(Provider):
    """``wavespeed``: a task, polled at ``data.urls.get`` until ``completed``; the image is a URL."""

    name = "wavespeed"

    def route(self, provider_model: str) -> str:
        return f"/api/v3/{provider_model}"

    def payload(self, request: GenerateRequest, route: Route, hub: str) -> dict[str, Any]:
        # A LoRA is served under its own provider model id: nothing to add.
        return {"prompt": request.prompt, **_flat_parameters(request)}

    def answer(self, data: Any, route: Route, router: str) -> Answer:
        task = _dict(_dict(data, "WaveSpeed's answer").get("data"), "WaveSpeed's task")
        get = _dict(task.get("urls"), "the task's urls").get("get")
        if not isinstance(get, str):
            raise ProviderError("WaveSpeed answered without a result URL")
        return Job(poll_url=f"{router.rstrip('/')}/{self.name}{urlsplit(get).path}")

    def poll(self, data: Any) -> PollAnswer:
        task = _dict(_dict(data, "WaveSpeed's result").get("data"), "WaveSpeed's task")
        status = task.get("status")
        if status == "completed":
            return ImageUrl(str(_first(task.get("outputs"), "outputs")))
        if status == "failed":
            return Failed(str(task.get("error") or "the task failed"))
        if status == "created":
            return Pending("queued")
        if status == "processing":
            return Pending("generating")
        raise ProviderError(f"unknown WaveSpeed status {status!r}")


class Together(Provider):
    """``together``: OpenAI-style images API; ``steps`` for the steps; base64 answer."""

    name = "together"

    def route(self, provider_model: str) -> str:
        return "/v1/images/generations"

    def payload(self, request: GenerateRequest, route: Route, hub: str) -> dict[str, Any]:
        parameters = _flat_parameters(request)
        if "num_inference_steps" in parameters:
            parameters["steps"] = parameters.pop("num_inference_steps")
        return {
            "prompt": request.prompt,
            "response_format": "base64",
            **parameters,
            "model": route.provider_model,
        }

    def answer(self, data: Any, route: Route, router: str) -> Answer:
        return _b64(
            _dict(_first(_dict(data, "the answer").get("data"), "images"), "an image").get("b64_json")
        )


class Nscale(Provider):
    """``nscale``: OpenAI-style images API; ``size: "WxH"``, no steps; base64 answer."""

    name = "nscale"

    def route(self, provider_model: str) -> str:
        return "/v1/images/generations"

    def payload(self, request: GenerateRequest, route: Route, hub: str) -> dict[str, Any]:
        parameters = _flat_parameters(request)
        if "width" in parameters and "height" in parameters:
            parameters["size"] = f"{parameters.pop('width')}x{parameters.pop('height')}"
        parameters.pop("num_inference_steps", None)
        parameters.pop("cfg_scale", None)
        return {
            "response_format": "b64_json",
            "prompt": request.prompt,
            "model": route.provider_model,
            **parameters,
        }

    def answer(self, data: Any, route: Route, router: str) -> Answer:
        return _b64(
            _dict(_first(_dict(data, "the answer").get("data"), "images"), "an image").get("b64_json")
        )


PROVIDERS: dict[str, Provider] = {
    provider.name: provider
    for provider in (HFInference(), FalAI(), Replicate(), WaveSpeed(), Together(), Nscale())
}
"""The adapters by provider name."""

ProviderName = Literal["auto", "hf-inference", "fal-ai", "replicate", "wavespeed", "together", "nscale"]
"""What ``SDClient(provider=...)`` takes."""
