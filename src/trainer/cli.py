"""``sdtrain``: DreamBooth fine-tuning of Stable Diffusion, from photos to a served model.

``sdtrain run`` does the whole flow; each of its steps is also a command (``check``,
``class-images``, ``train``, ``sample``, ``export``, ``publish``, ``serve``). Options come as flags
or from a ``--config run.toml`` / ``.yaml`` file (flags override the file).

Multi-GPU: ``accelerate launch -m trainer.cli train --config run.toml``.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from rich.table import Table

from trainer._console import console, error, shown, styled, warning
from trainer.config import (
    CKPT,
    INPUT,
    MAX_PHOTO_MEGAPIXELS,
    Architecture,
    Concept,
    RunConfig,
    RunRecord,
    build_config,
    load_config_file,
)
from trainer.errors import ConfigError, TrainerError, TrainingInterrupted
from trainer.serve import BUDGET_STEPS, ServeLimits

__all__ = ["app", "main"]

app = typer.Typer(
    name="sdtrain",
    help="Fine-tune Stable Diffusion on your photos (DreamBooth), export, publish and serve the model.",
    epilog=(
        "Whole flow:  sdtrain run --base-model stable-diffusion-v1-5/stable-diffusion-v1-5 "
        "--instance-dir photos/ --instance-prompt 'photo of sks man' --class-prompt 'photo of a man' "
        "--output runs/me\n\n"
        "Offline try-out:  sdtrain tiny-model base/ && sdtrain run --base-model base/ ...\n\n"
        "Guide: docs/trainer.md"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _default(name: str) -> str:
    """The default of a RunConfig field, as shown in --help."""
    value = RunConfig.model_fields[name].default
    return "derived" if value is None else str(value)


def _quiet_libraries() -> None:
    """Silence the per-file progress bars of diffusers/transformers/hub; rich shows our own."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        import diffusers.utils.logging
        import transformers.utils.logging
    except ImportError:  # the train extra is missing: the command will say so
        return
    for library in (diffusers.utils.logging, transformers.utils.logging):
        logging_module: Any = library  # untyped helpers
        logging_module.disable_progress_bar()
        logging_module.set_verbosity_error()


def _step_errors() -> tuple[type[Exception], ...]:
    """The error types of the export and publish steps (modules imported only if already loaded)."""
    import sys

    found: list[type[Exception]] = []
    for module, name in (("trainer.export", "ExportError"), ("trainer.publish", "PublishError")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            found.append(cls)
    return tuple(found)


@contextmanager
def _errors() -> Iterator[None]:
    """Print the trainer's errors as one clear message (no traceback) and exit non-zero."""
    from trainer.loading import ModelLoadError

    try:
        yield
    except TrainingInterrupted as exc:
        console.print(str(exc), style="yellow")
        raise typer.Exit(exc.exit_code) from None
    except ConfigError as exc:
        error(str(exc))
        raise typer.Exit(2) from None
    except Exception as exc:
        if not isinstance(exc, (TrainerError, ModelLoadError, *_step_errors())):
            raise  # a bug: keep the traceback
        error(str(exc))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("Interrupted.", style="yellow")
        raise typer.Exit(130) from None


# -- run / train ------------------------------------------------------------------------------------

_RUN_EPILOG = """Examples:

  sdtrain run --base-model stable-diffusion-v1-5/stable-diffusion-v1-5 --instance-dir photos/ --instance-prompt "photo of sks man" --class-prompt "photo of a man" --output runs/me

  sdtrain run --config run.toml --max-train-steps 800 --hub-repo me/sd-me

  sdtrain run --config run.toml --resume latest

Flags override the --config file. Interrupted (Ctrl-C, SIGTERM, a crash)? Run the same command again: it continues from the newest checkpoint. Publishing needs HF_TOKEN or `hf auth login`."""  # noqa: E501

_TRAIN_EPILOG = """Examples:

  sdtrain train --config run.toml

  accelerate launch -m trainer.cli train --config run.toml      (one process per GPU)

Runs check and class-images first (cached class images are reused); writes OUT/model and OUT/run.json but no samples or export."""  # noqa: E501


def _cli_type(annotation: Any) -> Any:
    """The type typer parses a field as: ``X | None`` -> ``X``; choices and lists arrive as text
    (pydantic validates them, naming the field)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) in (typing.Literal, list):
        return str
    return annotation


def _show_default(field: FieldInfo, shown: str | bool | None) -> str | bool:
    if shown is not None:
        return shown
    if field.annotation is bool or field.default is True or field.default is False:
        return "on" if field.default else "off"
    return False if field.default in (None, PydanticUndefined) else str(field.default)


def _field_options() -> list[tuple[str, Any]]:
    """``(parameter name, Annotated[type | None, typer.Option])`` for every option of ``run``/``train``,
    derived from the fields of :class:`Concept` and :class:`RunConfig` (their description is the help)."""
    fields: list[tuple[str, FieldInfo]] = []
    for name, field in RunConfig.model_fields.items():
        fields += list(Concept.model_fields.items()) if name == "concepts" else [(name, field)]
    options = []
    for name, field in fields:
        extra = field.json_schema_extra
        cli: dict[str, Any] = extra["cli"] if isinstance(extra, dict) else {}  # type: ignore[assignment]
        option = typer.Option(
            *cli.get("flags", []),
            help=field.description,
            rich_help_panel=cli.get("panel"),
            show_default=_show_default(field, cli.get("show_default")),
        )
        options.append((name, Annotated[_cli_type(field.annotation) | None, option]))
    return options


def _training_command(until: Literal["train", "publish"]) -> Callable[..., None]:
    """Build the `run` (whole flow) or `train` (up to the trained model) command; same options.

    Its options are RunConfig's fields (see :func:`_field_options`) plus ``--config`` and ``--resume``.
    """

    def command(config: Path | None = None, resume: str = "auto", **options: Any) -> None:
        _quiet_libraries()
        with _errors():
            run_config = build_config(config, **options)
            from trainer.run import run

            result = run(run_config, resume=resume, until=until)
        out = result.record.output_dir
        if result.record.method == "lora":
            console.print(styled(("Done.", "green"), f" LoRA adapter: {out / 'lora'}"))
        else:
            console.print(styled(("Done.", "green"), f" Model: {out / 'model'}"))
        if result.samples:
            console.print(f"Samples: {result.samples.grid.parent}")
        if result.export_path:
            for_tools = " (A1111, ComfyUI, Forge)" if result.record.method == "lora" else ""
            console.print(f"Single file{for_tools}: {result.export_path}")
        if result.hub_url:
            console.print(f"Hub: {result.hub_url}")

    keyword = inspect.Parameter.KEYWORD_ONLY
    config_option = typer.Option(
        "--config",
        "-c",
        help="TOML or YAML file with these options (snake_case keys).",
        rich_help_panel=INPUT,
        show_default=False,
    )
    resume_option = typer.Option(
        help="auto: continue from the newest checkpoint if any; latest: must continue; "
        "never: start over (deletes old checkpoints); or a checkpoint folder.",
        rich_help_panel=CKPT,
    )
    parameters = [
        inspect.Parameter("config", keyword, default=None, annotation=Annotated[Path | None, config_option]),
        *(inspect.Parameter(n, keyword, default=None, annotation=a) for n, a in _field_options()),
        inspect.Parameter("resume", keyword, default="auto", annotation=Annotated[str, resume_option]),
    ]
    command.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
    return command


app.command(
    "run",
    help="Do the whole flow: check photos, class images, train, samples, export (and publish).",
    epilog=_RUN_EPILOG,
)(_training_command("publish"))
app.command(
    "train",
    help="Train only: check photos, make missing class images, fine-tune, save OUT/model.",
    epilog=_TRAIN_EPILOG,
)(_training_command("train"))


# -- check ------------------------------------------------------------------------------------------


@app.command(
    epilog="Examples:\n\n  sdtrain check photos/ --resolution 512\n\n  sdtrain check --config run.toml",
)
def check(
    folders: Annotated[
        list[Path] | None, typer.Argument(help="Photo folders (default: the instance folders of --config).")
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(
            help="Training size in px: smaller photos are rejected.",
            show_default="from --base-model or --config, else 512",
        ),
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(help="Take the resolution and the bucket default from this model.", show_default=False),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Run config file.", show_default=False)
    ] = None,
    max_megapixels: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Larger photos are refused, from their header (nothing decoded).",
            show_default=f"from --config, else {MAX_PHOTO_MEGAPIXELS:g}",
        ),
    ] = None,
    aspect_buckets: Annotated[
        bool | None,
        typer.Option(
            "--aspect-buckets/--no-aspect-buckets",
            help="Show the aspect-ratio bucket each photo trains at.",
            show_default="from --config, else on for SDXL and FLUX --base-model",
        ),
    ] = None,
) -> None:
    """Check photos before training: every unusable file is listed at once, with the fix."""
    from trainer.buckets import describe_counts, run_buckets
    from trainer.photos import check_photos, crop_cut

    with _errors():
        data = load_config_file(config) if config else {}
        base = base_model or data.get("base_model")
        res = resolution or data.get("resolution")
        choice = aspect_buckets if aspect_buckets is not None else data.get("aspect_buckets")
        architecture: Architecture = "sd1"  # without a base model: a UNet's bucket step, buckets off
        if base and (res is None or choice is not False):
            _quiet_libraries()
            from trainer.run import inspect_base_model

            info = inspect_base_model(str(base))
            res, architecture = res or info.resolution, info.architecture
        res = int(res or 512)
        buckets = run_buckets(architecture, res, choice)
        dirs = list(folders or [])
        if not dirs:
            dirs = [Path(c["instance_dir"]) for c in data.get("concepts", []) if isinstance(c, dict)]
        if not dirs:
            raise ConfigError("Give photo folders (sdtrain check photos/) or a --config with concepts.")
        limit = float(max_megapixels or data.get("max_photo_megapixels") or MAX_PHOTO_MEGAPIXELS)
        checks = check_photos(dirs, resolution=res, max_megapixels=limit, buckets=buckets)
        in_buckets = " in aspect-ratio buckets" if buckets else ""
        for result in checks:
            size = f"{res} px training size{in_buckets}"
            title = f"{shown(result.folder)} ({len(result.photos)} photos, {size})"
            table = Table(title=title)
            table.add_column("photo")
            table.add_column("size", justify="right")
            table.add_column("format")
            table.add_column("trains at", justify="right")
            table.add_column("notes")
            for photo in result.photos:
                height, width = photo.target
                side, cut = crop_cut(photo.geometry)
                table.add_row(
                    shown(photo.path.name),
                    f"{photo.width}x{photo.height}",
                    photo.format,
                    f"{width}x{height}" + (f", {cut:.0%} of {side} cut" if cut >= 0.005 else ""),
                    ", ".join(photo.notes),
                )
            console.print(table)
            if buckets and result.photos:
                console.print(f"Buckets: {describe_counts(result.bucket_counts)}")
            for message in result.warnings:
                warning(message)
        total = sum(len(c.photos) for c in checks)
        console.print(f"All {total} photos are usable.", style="green")


# -- class-images ---------------------------------------------------------------------------------


@app.command(
    "class-images",
    epilog=(
        "Examples:\n\n  sdtrain class-images --base-model stable-diffusion-v1-5/stable-diffusion-v1-5 "
        "--class-prompt 'photo of a man' --class-dir class/man --num-class-images 200\n\n"
        "  sdtrain class-images --config run.toml"
    ),
)
def class_images(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Run config file.", show_default=False)
    ] = None,
    base_model: Annotated[str | None, typer.Option(help="Model that draws them.", show_default=False)] = None,
    class_prompt: Annotated[
        str | None, typer.Option(help="e.g. 'photo of a man'.", show_default=False)
    ] = None,
    class_dir: Annotated[Path | None, typer.Option(help="Cache folder.", show_default=False)] = None,
    num_class_images: Annotated[
        int | None, typer.Option(help="Images wanted per folder.", show_default=_default("num_class_images"))
    ] = None,
    class_batch_size: Annotated[
        int | None, typer.Option(help="Images per batch.", show_default=_default("class_batch_size"))
    ] = None,
    class_image_steps: Annotated[
        int | None, typer.Option(help="Inference steps.", show_default=_default("class_image_steps"))
    ] = None,
    resolution: Annotated[int | None, typer.Option(help="Size in px.", show_default="from the model")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Image i uses seed+i.", show_default=_default("seed"))
    ] = None,
) -> None:
    """Generate the class images prior preservation needs; only the missing ones are made."""
    _quiet_libraries()
    with _errors():
        data = load_config_file(config) if config else {}
        base = base_model or data.get("base_model")
        if not base:
            raise ConfigError("Give --base-model (or a --config with base_model).")
        jobs: list[tuple[str, Path]] = []
        if class_prompt or class_dir:
            if not (class_prompt and class_dir):
                raise ConfigError("Give both --class-prompt and --class-dir.")
            jobs.append((class_prompt, class_dir))
        elif config:
            record = build_config(config, base_model=base)
            jobs = [
                (c.class_prompt, c.class_dir)
                for c in record.resolved_concepts()
                if c.class_prompt and c.class_dir
            ]
        if not jobs:
            raise ConfigError(
                "Nothing to do: give --class-prompt and --class-dir, or a --config with class prompts."
            )
        from trainer.class_images import ensure_class_images
        from trainer.run import inspect_base_model

        res = resolution or data.get("resolution") or inspect_base_model(str(base)).resolution
        results = ensure_class_images(
            jobs,
            base_model=str(base),
            num_images=num_class_images
            or data.get("num_class_images")
            or RunConfig.model_fields["num_class_images"].default,
            resolution=int(res),
            batch_size=class_batch_size or data.get("class_batch_size") or 4,
            num_inference_steps=class_image_steps or data.get("class_image_steps") or 50,
            seed=seed if seed is not None else int(data.get("seed", RunConfig.model_fields["seed"].default)),
        )
        for r in results:
            console.print(f"{r.class_dir}: {r.generated} generated, {r.reused} reused")


# -- sample ---------------------------------------------------------------------------------------


def _model_dir(model: str) -> str:
    """A full fine-tune's run folder stands for its ``model/``; anything else is passed through."""
    from trainer.loading import resolve_run_model

    resolved, lora = resolve_run_model(model)
    return model if lora is not None else resolved


@app.command(
    epilog=(
        "Examples:\n\n  sdtrain sample runs/me          (prompt from run.json, into runs/me/samples)\n\n"
        "  sdtrain sample runs/me/model --prompt 'sks man as an astronaut' --num-images 8 --output out/"
    ),
)
def sample(
    model: Annotated[str, typer.Argument(help="Run folder, diffusers folder, single file or Hub id.")],
    prompt: Annotated[
        str | None, typer.Option(help="What to draw.", show_default="run.json's sample_prompt")
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="What to avoid.", show_default=False)] = None,
    num_images: Annotated[int, typer.Option(help="How many images.")] = 4,
    steps: Annotated[int, typer.Option(help="Inference steps.")] = 50,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance.")] = 7.5,
    seed: Annotated[
        int | None, typer.Option(help="Seed of image 0 (+1 per image).", show_default="run's seed, else 0")
    ] = None,
    resolution: Annotated[int | None, typer.Option(help="Size in px.", show_default="the model's")] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Folder for the PNGs.", show_default="RUN/samples or ./samples"),
    ] = None,
) -> None:
    """Generate sample images (PNG with prompt/seed metadata, plus grid.png)."""
    _quiet_libraries()
    with _errors():
        run_dir = Path(model)
        record = RunRecord.read(run_dir / "run.json") if (run_dir / "run.json").is_file() else None
        text = prompt or (record.sample_prompt if record else None)
        if not text:
            raise ConfigError("Give --prompt (only a run folder has a default prompt).")
        from trainer.loading import load_run_pipeline, resolve_run_model
        from trainer.sample import generate_samples

        base, lora = resolve_run_model(model)
        result = generate_samples(
            load_run_pipeline(model) if lora is not None else base,  # a LoRA run: base + adapter (+ --vae)
            output or (run_dir / "samples" if record else Path("samples")),
            prompt=text,
            negative_prompt=negative_prompt
            if negative_prompt is not None
            else (record.sample_negative_prompt if record else None),
            num_images=num_images,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            seed=seed if seed is not None else (record.sample_seed if record else 0),
            resolution=resolution or (record.resolution if record else None),
        )
        console.print(f"Grid: {result.grid}")


# -- export / publish / serve ---------------------------------------------------------------------


@app.command(
    epilog=(
        "Examples:\n\n  sdtrain export runs/me          (writes runs/me/export/model.safetensors, fp16)\n\n"
        "  sdtrain export runs/me/model --output sd-me.safetensors --full\n\n"
        "  sdtrain export --merge runs/me-lora    (base + adapter fused, one file)\n\n"
        "  sdtrain export runs/me-sd21 --base-single-file v2-1_768-ema-pruned.safetensors"
    ),
)
def export(
    model: Annotated[Path, typer.Argument(help="Run folder or diffusers folder.")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="File to write; the suffix picks .safetensors or .ckpt.",
            show_default="RUN/export/model.safetensors",
        ),
    ] = None,
    half: Annotated[bool, typer.Option("--half/--full", help="fp16 or fp32 weights.")] = True,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Convert back and compare every tensor.")
    ] = True,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge", help="MODEL is a LoRA run: fuse its adapter into its base model, then export."
        ),
    ] = False,
    base_model: Annotated[
        str | None,
        typer.Option(help="With --merge: the base to fuse into.", show_default="run.json's base_model"),
    ] = None,
    lora_scale: Annotated[float, typer.Option(help="With --merge: how much of the adapter to fuse.")] = 1.0,
    base_single_file: Annotated[
        Path | None,
        typer.Option(
            help="SD 2.x: the base model's own single file, to copy the text-encoder tensors diffusers "
            "drops (last OpenCLIP layer, text_projection, logit_scale) from.",
            show_default="left out, with a warning",
        ),
    ] = None,
) -> None:
    """Export a fine-tuned model to one original-layout checkpoint (A1111, ComfyUI).

    SD 2.x models also get FILE.yaml beside the checkpoint (the original inference config, which
    tells A1111 the model is v-prediction)."""
    _quiet_libraries()
    with _errors():
        if merge:
            from trainer.export import export_merged

            path = export_merged(
                model,
                output or model / "export" / "model.safetensors",
                base_model=base_model,
                lora_scale=lora_scale,
                half=half,
                verify=verify,
                base_single_file=base_single_file,
            )
            console.print(
                styled(("Exported", "green"), f" {path} (adapter fused into its base){_config_note(path)}")
            )
            return
        model_dir = Path(_model_dir(str(model)))
        if output is None:
            if model_dir == model:
                raise ConfigError(f"Give --output for {model} (only a run folder has a default export path).")
            output = model / "export" / "model.safetensors"
        from trainer.export import export_single_file

        path = export_single_file(
            model_dir, output, half=half, verify=verify, base_single_file=base_single_file
        )
        console.print(styled(("Exported", "green"), f" {path}{_config_note(path)}"))


def _config_note(checkpoint: Path) -> str:
    config = checkpoint.with_suffix(".yaml")
    return f" and {config} (its config, for A1111: keep them together)" if config.is_file() else ""


@app.command(
    epilog=(
        "Examples:\n\n  hf auth login && sdtrain publish runs/me me/sd-me\n\n"
        "  sdtrain publish runs/me --public          (repo from run.json's hub_repo)\n\n"
        "The token comes from HF_TOKEN or `hf auth login`; it is never a flag."
    ),
)
def publish(
    run_dir: Annotated[
        Path, typer.Argument(help="Run folder (run.json, samples/, and model/ + export/ or lora/).")
    ],
    repo_id: Annotated[
        str | None, typer.Argument(help="owner/name.", show_default="run.json's hub_repo")
    ] = None,
    private: Annotated[bool, typer.Option("--private/--public", help="Visibility of a new repo.")] = True,
) -> None:
    """Upload a run to a Hugging Face Hub repo: a full fine-tune (model, single file, samples, card)
    or a LoRA run as an adapter of its base (adapter files at the root, samples, card)."""
    with _errors():
        record = RunRecord.read(run_dir / "run.json")
        repo = repo_id or record.hub_repo
        if not repo:
            raise ConfigError("Give the repo id: sdtrain publish RUN_DIR owner/name.")
        from trainer.publish import FLUX_DEV_LICENSE_LINK, publish_run

        if record.architecture == "flux":
            console.print(
                "Note: FLUX.1-dev's license is non-commercial, and it covers this adapter "
                f"({FLUX_DEV_LICENSE_LINK})."
            )
        url = publish_run(run_dir, repo, private=private)
        console.print(styled(("Published", "green"), f" {url}"))


@app.command(
    epilog=(
        "Examples:\n\n  sdtrain serve runs/me --model-id me/sd-me --port 7860\n\n"
        "  sdtrain serve runs/me/export/model.safetensors --config runs/me/model\n\n"
        "Then: SDClient('http://127.0.0.1:7860/models/me/sd-me')"
    ),
)
def serve(
    model: Annotated[str, typer.Argument(help="Run folder, diffusers folder, single file or Hub id.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 7860,
    model_id: Annotated[
        str | None, typer.Option(help="Id in /models/{id}.", show_default="the folder name")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="Diffusers folder describing a single file's architecture.", show_default=False),
    ] = None,
    max_megapixel_steps: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Most width x height x steps / 10^6 one request may cost (1024 x 1024 x 30 = 31.5).",
            show_default=f"the model's resolution at {BUDGET_STEPS} steps",
        ),
    ] = None,
    max_prompt_chars: Annotated[
        int, typer.Option(min=1, help="Longest prompt.")
    ] = ServeLimits.max_prompt_chars,
    max_body_bytes: Annotated[
        int, typer.Option(min=1024, help="Largest request body.")
    ] = ServeLimits.max_body_bytes,
    request_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds after which a generation is stopped (503).")
    ] = ServeLimits.request_timeout_s,
) -> None:
    """Serve a model over the text-to-image protocol (what SDClient and the proxy speak).

    A LoRA run is served as its base model with the adapter; requests may set ``lora_scale``.
    Requests over the cost budget get a 422; a generation stops between steps when its client
    leaves, when it times out, or on SIGTERM / Ctrl+C."""
    _quiet_libraries()
    with _errors():
        from trainer.loading import resolve_run_model
        from trainer.serve import default_model_id
        from trainer.serve import serve as serve_model

        base, lora = resolve_run_model(model)
        # A LoRA run is drawn with the VAE it trained with (a full run saved it in its model).
        vae = RunRecord.read(Path(model) / "run.json").vae if lora is not None else None
        served_id = model_id or default_model_id(model)
        limits = ServeLimits(
            max_megapixel_steps=max_megapixel_steps,
            max_prompt_chars=max_prompt_chars,
            max_body_bytes=max_body_bytes,
            request_timeout_s=request_timeout,
        )
        serve_model(
            base, host=host, port=port, model_id=served_id, config=config, lora=lora, vae=vae, limits=limits
        )


# -- tiny-model -----------------------------------------------------------------------------------


@app.command(
    "tiny-model",
    epilog=(
        "Examples:\n\n  sdtrain tiny-model base/\n\n  sdtrain tiny-model base-v/ --variant sd2\n\n"
        "  sdtrain tiny-model base-xl/ --variant sdxl"
    ),
)
def tiny_model(
    out: Annotated[Path, typer.Argument(help="Folder to write.")],
    variant: Annotated[
        str,
        typer.Option(
            help="sd1 (epsilon), sd2 (v-prediction), sdxl (two text encoders) or flux (FLUX.1-dev)."
        ),
    ] = "sd1",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build a few-MB random Stable Diffusion (64 px) to try the flow offline."""
    _quiet_libraries()
    with _errors():
        from trainer.tiny import VARIANTS, build_tiny_pipeline

        if variant not in VARIANTS:
            raise ConfigError(f"--variant must be one of {', '.join(VARIANTS)}, not {variant!r}.")
        path = build_tiny_pipeline(out, variant=variant, seed=seed)
        console.print(f"Built a tiny {variant} pipeline in {path}")


def main(argv: list[str] | None = None) -> Any:
    """Console-script entry point (``sdtrain``)."""
    return app(args=argv, prog_name="sdtrain")


if __name__ == "__main__":
    main()
