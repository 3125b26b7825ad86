"""The cost budget of one request: what a caller may ask the model for, set per deployment.

A generation's cost grows with its pixels and its denoising steps, and with the images asked for
at once (the OpenAI route's `n`): `n x width x height x num_inference_steps`, counted in
megapixel-steps (10^6 pixel-steps), as `sdtrain serve --max-megapixel-steps` counts it. The
proxy does not know the model's own resolution or step count, so fields left unset count as an
SDXL-class default, 1024 x 1024 px and 30 steps, and the default budget
(`SDPROXY_MAX_MEGAPIXEL_STEPS`, 31.5) is one such image. A deployment of a 512 px model that never
needs more than 50 steps can set 13.2; one that allows larger images or more steps, more.

Prompts are bounded too (`SDPROXY_MAX_PROMPT_LENGTH`, at most `schemas.MAX_PROMPT_LENGTH`), and
bodies by `SDPROXY_MAX_BODY_BYTES` (`BodyLimitMiddleware`, every route). Every refusal is a 422
`validation_error` whose message names the limit and its variable, before anything is sent
upstream and before the caller's rate limit or quota is charged.
"""

from __future__ import annotations

from .config import Settings
from .deps import StateDep
from .errors import InvalidInput
from .schemas import GenerateBody

__all__ = ["ASSUMED_SIDE", "ASSUMED_STEPS", "check_budget", "within_budget"]

ASSUMED_SIDE = 1024
"""Pixels counted for an unset width or height (the model's own default is not known here)."""
ASSUMED_STEPS = 30
"""Steps counted for an unset `num_inference_steps`."""


def check_budget(settings: Settings, body: GenerateBody, images: int = 1) -> None:
    """Refuse a request over the deployment's limits.

    Args:
        settings: The limits (`max_megapixel_steps`, `max_images_per_request`, `max_prompt_length`).
        body: One image's generation fields.
        images: How many such images the request asks for.

    Raises:
        InvalidInput: Over a limit; the message names it and its variable.
    """
    if images > settings.max_images_per_request:
        raise InvalidInput(
            f"n: {images} images in one request, more than this proxy's {settings.max_images_per_request} "
            "(SDPROXY_MAX_IMAGES_PER_REQUEST): ask for fewer."
        )
    limit = settings.max_prompt_length
    for name, text in (("prompt", body.prompt), ("negative_prompt", body.negative_prompt)):
        if text is not None and len(text) > limit:
            raise InvalidInput(
                f"{name}: {len(text)} characters, more than this proxy's {limit} "
                "(SDPROXY_MAX_PROMPT_LENGTH); Stable Diffusion reads about 77 tokens anyway."
            )
    width = body.width or ASSUMED_SIDE
    height = body.height or ASSUMED_SIDE
    steps = body.num_inference_steps or ASSUMED_STEPS
    cost = images * width * height * steps / 1e6
    budget = settings.max_megapixel_steps
    if cost > budget:
        formula = "width x height x num_inference_steps"
        factors = f"{width} x {height} x {steps}"
        if images > 1:
            formula, factors = f"n x {formula}", f"{images} x {factors}"
        raise InvalidInput(
            f"{formula} = {factors} = {cost:.1f} megapixel-steps, over this proxy's budget of "
            f"{budget:.1f} (SDPROXY_MAX_MEGAPIXEL_STEPS): ask for fewer steps"
            + (", fewer images" if images > 1 else "")
            + " or a smaller image."
        )


async def within_budget(body: GenerateBody, state: StateDep) -> None:
    """Dependency of `/generate` and `/generate/stream`: `check_budget` on the body, run before
    the caller is admitted (so a refused request costs it nothing)."""
    check_budget(state.settings, body)
