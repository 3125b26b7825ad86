"""Publish a training run to the Hugging Face Hub: one repo, one commit, with a model card.

What goes up (and nothing else: no checkpoints, no class images, no ``run.json`` with local paths).
A full fine-tune:

```
<repo>/model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   (OUT/model/)
<repo>/<repo-name>.safetensors                                               (OUT/export/*)
<repo>/<repo-name>.yaml                       (SD 2.x: the original config A1111 reads beside it)
<repo>/samples/*.png                                                         (OUT/samples/)
<repo>/README.md                                                             (the model card)
```

A LoRA run (``method: lora`` in run.json), as an adapter of its base model:

```
<repo>/pytorch_lora_weights.safetensors     (OUT/lora/: diffusers, ``pipe.load_lora_weights(repo)``)
<repo>/<repo-name>_kohya.safetensors        (OUT/lora/pytorch_lora_weights_kohya.safetensors: A1111, ComfyUI)
<repo>/samples/*.png                        (OUT/samples/, the card's widget gallery)
<repo>/README.md                            (the model card)
```

The LoRA card's metadata carries ``base_model`` with ``base_model_relation: adapter`` (the Hub then
lists the repo among the base's adapters and tags it ``base_model:adapter:<base>``), the ``lora``
and ``template:sd-lora`` tags, ``instance_prompt`` (the trigger words) and a ``widget`` entry per
sample. A merged export (``sdtrain export --merge``) is not uploaded with the adapter. A FLUX LoRA's
card names FLUX.1-dev's license (``license: other``, ``license_name: flux-1-dev-non-commercial-license``)
and says that it is non-commercial; its usage section shows ``FluxPipeline`` in bfloat16.

The card is also written to ``OUT/README.md``. The token comes from the argument, else
``HF_TOKEN`` / ``hf auth login`` (``huggingface_hub.get_token()``); it is never written anywhere.

```python
from trainer.publish import publish_run

url = publish_run(Path("runs/me"), "me/sd-me")  # private by default
```
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from sdclient.protocol import HUB_ID
from trainer.errors import TrainerError
from trainer.lora_files import LORA_WEIGHTS

if TYPE_CHECKING:
    from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

__all__ = [
    "FLUX_DEV",
    "FLUX_DEV_LICENSE_LINK",
    "FLUX_DEV_LICENSE_NAME",
    "LICENSE_SD1",
    "LICENSE_SD2",
    "PublishError",
    "build_model_card",
    "planned_uploads",
    "publish_run",
]

logger = logging.getLogger(__name__)

# Licenses of the base families, used when run.json does not record the base model's license.
# Both are OpenRAIL licenses whose use restrictions carry over to derivatives.
LICENSE_SD1 = "creativeml-openrail-m"
LICENSE_SD2 = "openrail++"
# FLUX.1-dev's own license: non-commercial, so adapters of it are too (the Hub's id for it is "other").
FLUX_DEV = "black-forest-labs/FLUX.1-dev"
FLUX_DEV_LICENSE_NAME = "flux-1-dev-non-commercial-license"
FLUX_DEV_LICENSE_LINK = f"https://huggingface.co/{FLUX_DEV}/blob/main/LICENSE.md"
TAGS = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "dreambooth"]
# The tags diffusers' own LoRA training scripts give their cards (template:sd-lora: the Hub's LoRA
# gallery template), then the family's.
LORA_TAGS = ["text-to-image", "diffusers", "lora", "template:sd-lora", "dreambooth"]
FAMILY_TAGS = {
    "sd1": ["stable-diffusion", "stable-diffusion-diffusers"],
    "sd2": ["stable-diffusion", "stable-diffusion-diffusers"],
    "sdxl": ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"],
    "flux": ["flux"],
}
TOKENS_URL = "https://huggingface.co/settings/tokens"


def _is_hub_repo(name: str) -> bool:
    """Whether a base model names a Hub repo (``owner/name``), not a local folder."""
    return "/" in name and bool(HUB_ID.fullmatch(name)) and not Path(name).exists()


_MAX_SAMPLES_SHOWN = 8


class PublishError(TrainerError):
    """The run cannot be published; the message says why and what to do (never the token)."""


class _Concept(BaseModel):
    model_config = ConfigDict(extra="ignore")

    instance_prompt: str
    class_prompt: str | None = None


class _RunInfo(BaseModel):
    """The fields of ``run.json`` the model card uses."""

    model_config = ConfigDict(extra="ignore")

    base_model: str
    base_model_license: str | None = None
    concepts: list[_Concept]
    resolution: int | None = None
    max_train_steps: int | None = None
    train_text_encoder: bool | None = None
    learning_rate: float | None = None
    seed: int | None = None
    prediction_type: str | None = None
    sample_prompt: str | None = None
    mixed_precision: str | None = None
    with_prior_preservation: bool | None = None
    num_class_images: int | None = None
    method: str | None = None  # records from before LoRA runs are full fine-tunes
    architecture: str | None = None
    lora_rank: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    lora_target_modules: list[str] | None = None

    @property
    def is_lora(self) -> bool:
        return self.method == "lora"


def _read_run(run_dir: Path) -> _RunInfo:
    path = run_dir / "run.json"
    if not path.is_file():
        raise PublishError(f"{path} is missing: publish a folder made by `sdtrain run` (or `sdtrain train`).")
    try:
        return _RunInfo.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise PublishError(f"{path} is not a valid run record: {exc}") from exc


def _is_sd2(model_dir: Path) -> bool:
    config = model_dir / "text_encoder" / "config.json"
    if not config.is_file():
        return False
    return bool(json.loads(config.read_text(encoding="utf-8")).get("hidden_act") == "gelu")


def _license(info: _RunInfo, model_dir: Path) -> tuple[str, bool]:
    """The base model's license, and whether it was inferred from the architecture."""
    if info.base_model_license:
        return info.base_model_license, False
    return (LICENSE_SD2 if _is_sd2(model_dir) else LICENSE_SD1), True


def _samples(run_dir: Path) -> list[Path]:
    folder = run_dir / "samples"
    return sorted(p for p in folder.glob("*.png") if p.is_file()) if folder.is_dir() else []


def _sample_prompt(path: Path, fallback: str) -> str:
    """The prompt recorded in a sample's PNG text chunks, else ``fallback``."""
    from PIL import Image

    with Image.open(path) as image:
        text = getattr(image, "text", None) or {}
    return str(text.get("prompt") or fallback)


def _single_files(run_dir: Path) -> list[Path]:
    folder = run_dir / "export"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".ckpt"))


def _single_file_name(path: Path, repo_id: str) -> str:
    """``export/model.safetensors`` -> ``<repo-name>.safetensors`` (other names are kept)."""
    name = repo_id.split("/")[-1]
    return f"{name}{path.suffix}" if path.stem == "model" else path.name


def build_model_card(run_dir: Path, repo_id: str) -> ModelCard:
    """The model card of a run: metadata for the Hub plus samples, settings and usage.

    Metadata: ``base_model`` (when it is a Hub id), ``license`` (run.json's ``base_model_license``,
    else ``creativeml-openrail-m`` for SD 1.x / ``openrail++`` for SD 2.x architectures),
    ``library_name: diffusers``, ``pipeline_tag: text-to-image`` (InferenceClient requires it),
    ``tags``, ``instance_prompt`` and a ``widget`` showing the first sample.

    A LoRA run (run.json's ``method: lora``) gets an adapter's card instead: ``base_model`` with
    ``base_model_relation: adapter``, the ``lora`` tags, a ``widget`` entry per sample, and usage
    for diffusers (``load_lora_weights``), Inference Providers and A1111 / ComfyUI.

    Args:
        run_dir: The run folder (``run.json``, ``model/``, ``samples/``, ``export/``).
        repo_id: The repo the card is for (used in the snippets).

    Raises:
        PublishError: ``run.json`` is missing or invalid.
    """
    from huggingface_hub import ModelCard, ModelCardData

    info = _read_run(run_dir)
    if info.is_lora:
        return _lora_model_card(run_dir, repo_id, info)
    model_dir = run_dir / "model"
    license_id, inferred = _license(info, model_dir)
    samples = [p for p in _samples(run_dir) if p.stem != "grid"]
    grid = run_dir / "samples" / "grid.png"
    prompts = [c.instance_prompt for c in info.concepts]
    example_prompt = info.sample_prompt or prompts[0]
    widget = []
    if samples:
        first = samples[0]
        widget = [
            {
                "text": _sample_prompt(first, example_prompt),
                "output": {"url": f"samples/{first.name}"},
            }
        ]
    data = ModelCardData(
        base_model=info.base_model if _is_hub_repo(info.base_model) else None,
        license=license_id,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=list(TAGS),
        instance_prompt=prompts[0] if len(prompts) == 1 else prompts,
        widget=widget or None,
    )
    single = _single_files(run_dir)
    name = repo_id.split("/")[-1]
    body = [
        f"# {name}",
        "",
        _intro(info),
        "",
        "## Prompts",
        "",
        *_prompts_and_samples(
            info, samples, grid, f"Put the instance prompt's words in your prompt, e.g. `{example_prompt}`."
        ),
    ]
    body += ["## Training", "", "| setting | value |", "| --- | --- |"]
    body += [f"| {k} | {v} |" for k, v in _settings(info)]
    with_config = bool(single) and single[0].with_suffix(".yaml").is_file()
    body += [
        "",
        *_usage(repo_id, info, example_prompt, [_single_file_name(p, repo_id) for p in single], with_config),
    ]
    note = " (inferred from the architecture: check the base model's card)" if inferred else ""
    body += [
        "",
        "## License",
        "",
        f"`{license_id}`, inherited from the base model{note}. Its use restrictions apply to this model "
        "and to the images made with it.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _lora_model_card(run_dir: Path, repo_id: str, info: _RunInfo) -> ModelCard:
    """The card of a LoRA run: an adapter of ``info.base_model``, with a widget gallery."""
    from huggingface_hub import ModelCard, ModelCardData

    on_hub = _is_hub_repo(info.base_model)
    if not on_hub:
        logger.warning(
            "The base model %s is not a Hub id: the card cannot name it as base_model, so the Hub will "
            "not list this adapter under its base (and no Inference Provider will pick it up).",
            info.base_model,
        )
    architecture = info.architecture or "sd1"
    # No model folder to look at: the family comes from run.json (SDXL's license is Open RAIL++-M too).
    inferred = not info.base_model_license
    license_id = info.base_model_license or (LICENSE_SD1 if architecture == "sd1" else LICENSE_SD2)
    flux_dev = architecture == "flux" and info.base_model_license in (None, "other")
    if flux_dev:
        license_id = "other"
    samples = [p for p in _samples(run_dir) if p.stem != "grid"][:_MAX_SAMPLES_SHOWN]
    grid = run_dir / "samples" / "grid.png"
    prompts = [c.instance_prompt for c in info.concepts]
    example_prompt = info.sample_prompt or prompts[0]
    widget = [
        {"text": _sample_prompt(path, example_prompt), "output": {"url": f"samples/{path.name}"}}
        for path in samples
    ]
    data = ModelCardData(
        base_model=info.base_model if on_hub else None,
        base_model_relation="adapter" if on_hub else None,
        license=license_id,
        license_name=FLUX_DEV_LICENSE_NAME if flux_dev else None,
        license_link=FLUX_DEV_LICENSE_LINK if flux_dev else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=[*LORA_TAGS, *FAMILY_TAGS.get(architecture, [])],
        instance_prompt=prompts[0] if len(prompts) == 1 else prompts,
        widget=widget or None,
    )
    name = repo_id.split("/")[-1]
    base = info.base_model
    link = f"[{base}](https://huggingface.co/{base})" if on_hub else f"`{base}`"
    body = [
        f"# {name}",
        "",
        f"A DreamBooth LoRA adapter for {link}, trained with `sdtrain` on photos of the subject below. "
        "It is small and needs its base model to make images.",
        "",
        *(
            [
                f"**Non-commercial.** FLUX.1-dev's license ([{FLUX_DEV_LICENSE_NAME}]"
                f"({FLUX_DEV_LICENSE_LINK})) allows non-commercial use only, and it covers this adapter "
                "and the images made with it.",
                "",
            ]
            if flux_dev
            else []
        ),
        "## Trigger words",
        "",
        *_prompts_and_samples(info, samples, grid, f"Put them in your prompt, e.g. `{example_prompt}`."),
    ]
    body += [
        "## Files",
        "",
        "| file | for |",
        "| --- | --- |",
        f"| `{LORA_WEIGHTS}` | diffusers (`pipe.load_lora_weights`), the Hub and Inference Providers |",
        (
            f"| `{_kohya_name(repo_id)}` | ComfyUI, Forge (BFL's key names, as sd-scripts writes them) |"
            if architecture == "flux"
            else f"| `{_kohya_name(repo_id)}` | AUTOMATIC1111, ComfyUI, Forge (kohya's key names) |"
        ),
        "",
    ]
    body += ["## Training", "", "| setting | value |", "| --- | --- |"]
    body += [f"| {k} | {v} |" for k, v in _settings(info)]
    body += ["", *_lora_usage(repo_id, info, example_prompt, on_hub)]
    note = " (inferred from the architecture: check the base model's card)" if inferred else ""
    body += ["", "## License", ""]
    if flux_dev:
        body += [
            f"The [FLUX.1 [dev] Non-Commercial License]({FLUX_DEV_LICENSE_LINK}), inherited from "
            "FLUX.1-dev: non-commercial use only. It applies to this adapter and to the images made "
            "with it.",
            "",
        ]
    else:
        body += [
            f"`{license_id}`, inherited from the base model{note}. Its use restrictions apply to this "
            "adapter and to the images made with it.",
            "",
        ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _lora_usage(repo_id: str, info: _RunInfo, prompt: str, on_hub: bool) -> list[str]:
    if info.architecture == "flux":
        return _flux_lora_usage(repo_id, info, prompt, on_hub)
    literal = json.dumps(prompt)  # a valid Python string literal, whatever the prompt holds
    pipeline = "StableDiffusionXLPipeline" if info.architecture == "sdxl" else "StableDiffusionPipeline"
    base = info.base_model if on_hub else "<the base model>"
    kohya = _kohya_name(repo_id)
    lines = [
        "## Use it",
        "",
        "With diffusers, on top of the base model:",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        "",
        f'pipe = {pipeline}.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda")',
        f'pipe.load_lora_weights("{repo_id}")',
        f"image = pipe({literal}, num_inference_steps=30).images[0]",
        'image.save("image.png")',
        "```",
        "",
        (
            "Through Inference Providers, once a provider serves this adapter (providers such as fal-ai "
            "pick up LoRAs of the bases they host, SDXL and FLUX.1-dev, from this card's adapter "
            'metadata; the model page shows them under "Inference Providers"):'
            if info.architecture == "sdxl"
            else "Through Inference Providers, if one serves this adapter (they host LoRAs of SDXL and "
            "FLUX.1-dev; SD 1.x / 2.x adapters are usually served from a dedicated Inference Endpoint "
            "instead, see below):"
        ),
        "",
        *_provider_usage(repo_id, literal),
        "",
        "When no provider serves it, run the base with the adapter on a dedicated Inference Endpoint "
        "or locally: `sdtrain serve RUN_DIR` (the training run folder) serves the base model with this "
        "adapter.",
        "",
        f"In AUTOMATIC1111 / Forge: put `{kohya}` in `models/Lora` and add "
        f"`<lora:{kohya.removesuffix('.safetensors')}:1>` to the prompt. In ComfyUI: put it in "
        "`models/loras` and load it with a `LoraLoader` node after the base checkpoint.",
    ]
    return lines


def _provider_usage(repo_id: str, literal: str) -> list[str]:
    """The card's snippets calling the adapter through Inference Providers."""
    return [
        "```python",
        "from huggingface_hub import InferenceClient",
        "",
        'client = InferenceClient(provider="fal-ai")  # token: HF_TOKEN or `hf auth login`',
        f'image = client.text_to_image({literal}, model="{repo_id}")',
        'image.save("image.png")',
        "```",
        "",
        "or with `sdclient`, which finds the provider itself:",
        "",
        "```python",
        "import asyncio",
        "from sdclient import SDClient",
        "",
        "async def main() -> None:",
        f'    async with SDClient("{repo_id}") as client:',
        f"        image = await client.generate({literal}, seed=42)",
        '        image.save("image.png")',
        "",
        "asyncio.run(main())",
        "```",
    ]


def _flux_lora_usage(repo_id: str, info: _RunInfo, prompt: str, on_hub: bool) -> list[str]:
    literal = json.dumps(prompt)
    base = info.base_model if on_hub else FLUX_DEV
    kohya = _kohya_name(repo_id)
    return [
        "## Use it",
        "",
        "With diffusers, on top of FLUX.1-dev (a gated repo: accept its license on the Hub first):",
        "",
        "```python",
        "import torch",
        "from diffusers import FluxPipeline",
        "",
        f'pipe = FluxPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")',
        f'pipe.load_lora_weights("{repo_id}")',
        f"image = pipe({literal}, num_inference_steps=28, guidance_scale=3.5).images[0]",
        'image.save("image.png")',
        "```",
        "",
        "Through Inference Providers: fal-ai serves FLUX.1-dev LoRAs (its `fal-ai/flux-lora` endpoint) "
        "from this card's adapter metadata once the repo is public; the model page shows the providers "
        'under "Inference Providers":',
        "",
        *_provider_usage(repo_id, literal),
        "",
        f"In ComfyUI: put `{kohya}` (BFL's key names, as sd-scripts writes them) in `models/loras` and "
        "load it with a `LoraLoaderModelOnly` node after the FLUX.1-dev model. In Forge: put it in "
        f"`models/Lora` and add `<lora:{kohya.removesuffix('.safetensors')}:1>` to the prompt.",
    ]


def _kohya_name(repo_id: str) -> str:
    return f"{repo_id.split('/')[-1]}_kohya.safetensors"


def _intro(info: _RunInfo) -> str:
    base = info.base_model
    link = f"[{base}](https://huggingface.co/{base})" if _is_hub_repo(base) else f"`{base}`"
    return f"A DreamBooth fine-tune of {link}, trained with `sdtrain` on photos of the subject below."


def _settings(info: _RunInfo) -> list[tuple[str, str]]:
    rows: list[tuple[str, Any]] = [
        ("base model", f"`{info.base_model}`"),
        ("steps", info.max_train_steps),
        ("resolution", f"{info.resolution} px" if info.resolution else None),
        ("learning rate", info.learning_rate),
        ("method", "LoRA" if info.is_lora else "full fine-tune" if info.method == "full" else None),
        ("LoRA rank", info.lora_rank if info.is_lora else None),
        ("LoRA alpha", info.lora_alpha if info.is_lora else None),
        ("LoRA dropout", info.lora_dropout if info.is_lora else None),
        (
            "LoRA target modules",
            ", ".join(f"`{m}`" for m in info.lora_target_modules)
            if info.is_lora and info.lora_target_modules
            else None,
        ),
        ("text encoder trained", info.train_text_encoder),
        ("prediction type", info.prediction_type),
        ("mixed precision", info.mixed_precision),
        ("seed", info.seed),
    ]
    if info.with_prior_preservation:
        classes = ", ".join(f"`{c.class_prompt}`" for c in info.concepts if c.class_prompt)
        rows.append(("prior preservation", f"{info.num_class_images or '?'} class images of {classes}"))
    elif info.with_prior_preservation is not None:
        rows.append(("prior preservation", "no"))
    return [(k, "yes" if v is True else "no" if v is False else str(v)) for k, v in rows if v is not None]


def _prompts_and_samples(info: _RunInfo, samples: list[Path], grid: Path, hint: str) -> list[str]:
    """The card's list of the run's prompts, then its samples (when there are some)."""
    lines = [
        *[
            f"- `{c.instance_prompt}`" + (f" (class: `{c.class_prompt}`)" if c.class_prompt else "")
            for c in info.concepts
        ],
        "",
        hint,
        "",
    ]
    if samples or grid.is_file():
        shown = samples[:_MAX_SAMPLES_SHOWN] or [grid]
        lines += ["## Samples", "", " ".join(f"![{p.stem}](samples/{p.name})" for p in shown), ""]
        if info.sample_prompt:
            lines += [f"Prompt: `{info.sample_prompt}` (each PNG records its prompt and seed).", ""]
    return lines


def _usage(
    repo_id: str, info: _RunInfo, prompt: str, single_files: list[str], with_config: bool = False
) -> list[str]:
    literal = json.dumps(prompt)  # a valid Python string literal, whatever the prompt holds
    pipeline = "StableDiffusionXLPipeline" if info.architecture == "sdxl" else "StableDiffusionPipeline"
    lines = [
        "## Use it",
        "",
        "With diffusers:",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        "",
        f'pipe = {pipeline}.from_pretrained("{repo_id}", torch_dtype=torch.float16).to("cuda")',
        f"image = pipe({literal}, num_inference_steps=50, guidance_scale=7.5).images[0]",
        'image.save("image.png")',
        "```",
        "",
    ]
    if single_files:
        file = single_files[0]
        lines += [
            f"`{file}` is the same model as one original-layout checkpoint (AUTOMATIC1111, ComfyUI); in "
            f'diffusers: `{pipeline}.from_single_file("https://huggingface.co/{repo_id}/blob/main/{file}")`.',
            "",
        ]
        if with_config:
            config = Path(file).with_suffix(".yaml").name
            lines += [
                f"Download `{config}` too and keep it beside `{file}`: AUTOMATIC1111 reads it to know that "
                "this SD 2.x model predicts v. ComfyUI guesses that from the weights; if its images look "
                "washed out or noisy, add a `ModelSamplingDiscrete` node set to `v_prediction`.",
                "",
            ]
    lines += [
        "With `sdclient`, from a dedicated Inference Endpoint running this repo or a local server "
        f"(`sdtrain serve {repo_id} --model-id {repo_id}`):",
        "",
        "```python",
        "import asyncio",
        "from sdclient import SDClient",
        "",
        "async def main() -> None:",
        f'    async with SDClient("http://127.0.0.1:7860/models/{repo_id}") as client:',
        f"        image = await client.generate({literal}, seed=42)",
        '        image.save("image.png")',
        "",
        "asyncio.run(main())",
        "```",
    ]
    return lines


def planned_uploads(run_dir: Path, repo_id: str) -> list[tuple[Path, str]]:
    """``(local file, path in repo)`` for everything a publish uploads, README.md excluded.

    Raises:
        PublishError: the run has no diffusers model (full fine-tune) or no adapter (LoRA run).
    """
    if (run_dir / "run.json").is_file() and _read_run(run_dir).is_lora:
        return _lora_uploads(run_dir, repo_id)
    model_dir = run_dir / "model"
    if not (model_dir / "model_index.json").is_file():
        raise PublishError(
            f"{model_dir} has no model_index.json: train first (`sdtrain run`), then publish the run folder."
        )
    uploads = [
        (path, path.relative_to(model_dir).as_posix())
        for path in sorted(model_dir.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(model_dir).parts)
    ]
    single = _single_files(run_dir)
    if not single:
        logger.warning(
            "%s has no single file: run `sdtrain export %s` to include one.", run_dir / "export", run_dir
        )
    uploads += [(path, _single_file_name(path, repo_id)) for path in single]
    # An SD 2.x file's .yaml (what A1111 reads to know it is v-prediction) goes up under the same name.
    uploads += [
        (path.with_suffix(".yaml"), Path(_single_file_name(path, repo_id)).with_suffix(".yaml").as_posix())
        for path in single
        if path.with_suffix(".yaml").is_file()
    ]
    uploads += [(path, f"samples/{path.name}") for path in _samples(run_dir)]
    return uploads


def _lora_uploads(run_dir: Path, repo_id: str) -> list[tuple[Path, str]]:
    """A LoRA run's files: both adapter files at the repo root, then the samples."""
    from trainer.lora_files import KOHYA_WEIGHTS, LORA_DIR, write_kohya_file

    lora_dir = run_dir / LORA_DIR
    weights = lora_dir / LORA_WEIGHTS
    if not weights.is_file():
        raise PublishError(
            f"{weights} is missing: train first (`sdtrain run --method lora`), then publish the run folder."
        )
    kohya = lora_dir / KOHYA_WEIGHTS
    if not kohya.is_file():
        logger.info("Writing the kohya file %s (the run stopped before its export step)", kohya)
        write_kohya_file(lora_dir, architecture=_read_run(run_dir).architecture or "sd1")
    merged = _single_files(run_dir)
    if merged:
        logger.info(
            "Not uploading %s: the repo holds the adapter; publish a merged model as a repo of its own.",
            ", ".join(str(p) for p in merged),
        )
    uploads = [(weights, LORA_WEIGHTS), (kohya, _kohya_name(repo_id))]
    return uploads + [(path, f"samples/{path.name}") for path in _samples(run_dir)]


def _http_error(exc: Exception, repo_id: str) -> PublishError:
    from huggingface_hub.errors import HfHubHTTPError

    status = (
        exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    )
    if status == 403:
        return PublishError(
            f"The Hub refused to write to {repo_id} (403): this token can't write: create a token with "
            f"write access at {TOKENS_URL} (and check that you may write to the '{repo_id.split('/')[0]}' "
            "namespace), then `hf auth login` or set HF_TOKEN."
        )
    if status == 401:
        return PublishError(
            "The Hub rejected the token (401): it is invalid or expired. Run `hf auth login` again or set "
            f"HF_TOKEN to a token with write access ({TOKENS_URL})."
        )
    server_message = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
    return PublishError(f"Publishing to {repo_id} failed ({status or type(exc).__name__}): {server_message}")


def publish_run(
    run_dir: Path,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Upload a run to a Hub model repo in one commit, with a model card.

    Args:
        run_dir: The run folder (``model/``, ``export/``, ``samples/``, ``run.json``).
        repo_id: ``owner/name`` (or ``name`` for the token's own namespace). Created if missing.
        private: Visibility of a *new* repo (an existing repo keeps its visibility).
        token: A Hub token with write access; default ``HF_TOKEN`` or the one saved by
            ``hf auth login`` (``huggingface_hub.get_token()``). Never written to disk.
        api: The ``HfApi`` to use (e.g. another endpoint); default ``HfApi()``.

    Returns:
        The repo's URL.

    Raises:
        PublishError: no token, a token that cannot write, an invalid repo id, an incomplete run,
            or the Hub refused the upload (the message says which and what to do).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # lazily exported

    run_dir = Path(run_dir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PublishError(f"Invalid repo id {repo_id!r}: use owner/name, e.g. me/sd-me ({exc}).") from None
    uploads = planned_uploads(run_dir, repo_id)
    card = build_model_card(run_dir, repo_id)
    lora = _read_run(run_dir).is_lora

    token = token or (api.token if api is not None and isinstance(api.token, str) else None) or get_token()
    if not token:
        raise PublishError(
            "No Hugging Face token found: run `hf auth login` or set HF_TOKEN "
            f"(create a token with write access at {TOKENS_URL})."
        )
    api = api if api is not None else HfApi()

    readme = run_dir / "README.md"
    card.save(readme)
    operations: list[CommitOperationAdd] = [
        CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=local) for local, in_repo in uploads
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=readme))
    size_mb = sum(local.stat().st_size for local, _ in uploads) / 1e6
    logger.info("Publishing %d files (%.1f MB) to %s", len(operations), size_mb, repo_id)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        api.create_commit(
            url.repo_id,
            operations,
            commit_message=f"Upload DreamBooth {'LoRA adapter' if lora else 'model'} (sdtrain)",
            commit_description=(
                "LoRA adapter (diffusers and kohya files), samples and model card."
                if lora
                else "Diffusers folder, single-file checkpoint, samples and model card."
            ),
            repo_type="model",
            token=token,
        )
    except OfflineModeIsEnabled:
        raise PublishError("HF_HUB_OFFLINE is set: unset it to publish to the Hub.") from None
    except HfHubHTTPError as exc:
        raise _http_error(exc, repo_id) from exc
    logger.info("Published %s", url)
    return str(url)
