"""``sdtrain``: DreamBooth fine-tuning of Stable Diffusion, from photos to a served model.

``sdtrain run`` does the whole flow; each of its steps is also a command (``check``,
``class-images``, ``train``, ``sample``, ``export``, ``publish``, ``serve``). Options come as flags
or from a ``--config run.toml`` / ``.yaml`` file (flags override the file).

Multi-GPU: ``accelerate launch -m trainer.cli train --config run.toml``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table

from trainer._console import console
from trainer.config import DEFAULT_LEARNING_RATE, RunConfig, RunRecord, build_config, load_config_file
from trainer.errors import ConfigError, TrainerError, TrainingInterrupted

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

# Help panels group the many options of `run` and `train`.
_INPUT = "Input and output"
_TRAIN = "Training"
_PRIOR = "Prior preservation (class images)"
_SPEED = "Memory and speed"
_CKPT = "Checkpoints and resuming"
_SAMPLE = "Samples"
_EXPORT = "Export and publish"


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
        console.print(f"[yellow]{escape(str(exc))}[/]")
        raise typer.Exit(exc.exit_code) from None
    except ConfigError as exc:
        console.print(f"[red]Error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    except Exception as exc:
        if not isinstance(exc, (TrainerError, ModelLoadError, *_step_errors())):
            raise  # a bug: keep the traceback
        console.print(f"[red]Error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/]")
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


def _training_command(until: Literal["train", "publish"]) -> Callable[..., None]:
    """Build the `run` (whole flow) or `train` (up to the saved model) command; same options."""

    def command(
        config: Annotated[
            Path | None,
            typer.Option(
                "--config",
                "-c",
                help="TOML or YAML file with these options (snake_case keys).",
                rich_help_panel=_INPUT,
                show_default=False,
            ),
        ] = None,
        base_model: Annotated[
            str | None,
            typer.Option(
                help="Hub id (stable-diffusion-v1-5/stable-diffusion-v1-5) or diffusers folder.",
                rich_help_panel=_INPUT,
                show_default=False,
            ),
        ] = None,
        instance_dir: Annotated[
            Path | None,
            typer.Option(
                help="Folder with 5-20 photos of the subject (JPEG, PNG, WebP).",
                rich_help_panel=_INPUT,
                show_default=False,
            ),
        ] = None,
        instance_prompt: Annotated[
            str | None,
            typer.Option(
                help="Prompt naming the subject with a rare token: 'photo of sks man'.",
                rich_help_panel=_INPUT,
                show_default=False,
            ),
        ] = None,
        class_prompt: Annotated[
            str | None,
            typer.Option(
                help="The subject's class: 'photo of a man' (prior preservation).",
                rich_help_panel=_INPUT,
                show_default=False,
            ),
        ] = None,
        class_dir: Annotated[
            Path | None,
            typer.Option(
                help="Class image cache.",
                rich_help_panel=_INPUT,
                show_default="OUT/class_images/<class prompt>",
            ),
        ] = None,
        output: Annotated[
            Path | None,
            typer.Option(
                "--output",
                "-o",
                help="Run folder (model/, checkpoints/, samples/, export/).",
                rich_help_panel=_INPUT,
                show_default=False,
            ),
        ] = None,
        resolution: Annotated[
            int | None,
            typer.Option(
                help="Training size in px.",
                rich_help_panel=_TRAIN,
                show_default="from the model: 512 SD 1.5, 768 SD 2.1",
            ),
        ] = None,
        max_train_steps: Annotated[
            int | None,
            typer.Option(
                help="Optimizer steps.",
                rich_help_panel=_TRAIN,
                show_default="100 per photo, +100 under 10 photos",
            ),
        ] = None,
        learning_rate: Annotated[
            float | None,
            typer.Option(
                help="AdamW learning rate.", rich_help_panel=_TRAIN, show_default=str(DEFAULT_LEARNING_RATE)
            ),
        ] = None,
        lr_scheduler: Annotated[
            str | None,
            typer.Option(
                help="constant, constant_with_warmup, linear or cosine.",
                rich_help_panel=_TRAIN,
                show_default=_default("lr_scheduler"),
            ),
        ] = None,
        lr_warmup_steps: Annotated[
            int | None,
            typer.Option(
                help="Warm-up steps (with constant_with_warmup).",
                rich_help_panel=_TRAIN,
                show_default=_default("lr_warmup_steps"),
            ),
        ] = None,
        train_batch_size: Annotated[
            int | None,
            typer.Option(
                help="Photos per step and GPU.",
                rich_help_panel=_TRAIN,
                show_default=_default("train_batch_size"),
            ),
        ] = None,
        gradient_accumulation_steps: Annotated[
            int | None,
            typer.Option(
                help="Micro-batches per optimizer step.",
                rich_help_panel=_TRAIN,
                show_default=_default("gradient_accumulation_steps"),
            ),
        ] = None,
        train_text_encoder: Annotated[
            bool | None,
            typer.Option(
                "--train-text-encoder/--no-train-text-encoder",
                help="Fine-tune the text encoder too.",
                rich_help_panel=_TRAIN,
                show_default=_default("train_text_encoder"),
            ),
        ] = None,
        noise_offset: Annotated[
            float | None,
            typer.Option(
                help="Noise offset (0.05-0.1 helps very dark/bright images).",
                rich_help_panel=_TRAIN,
                show_default=_default("noise_offset"),
            ),
        ] = None,
        seed: Annotated[
            int | None,
            typer.Option(
                help="Seed for everything random.", rich_help_panel=_TRAIN, show_default=_default("seed")
            ),
        ] = None,
        prior_preservation: Annotated[
            bool | None,
            typer.Option(
                "--prior-preservation/--no-prior-preservation",
                help="Train on class images too, so the class is not forgotten.",
                rich_help_panel=_PRIOR,
                show_default="on",
            ),
        ] = None,
        prior_loss_weight: Annotated[
            float | None,
            typer.Option(
                help="Weight of the class images' loss.",
                rich_help_panel=_PRIOR,
                show_default=_default("prior_loss_weight"),
            ),
        ] = None,
        num_class_images: Annotated[
            int | None,
            typer.Option(
                help="Class images per concept.",
                rich_help_panel=_PRIOR,
                show_default=_default("num_class_images"),
            ),
        ] = None,
        class_batch_size: Annotated[
            int | None,
            typer.Option(
                help="Class images generated per batch.",
                rich_help_panel=_PRIOR,
                show_default=_default("class_batch_size"),
            ),
        ] = None,
        class_image_steps: Annotated[
            int | None,
            typer.Option(
                help="Inference steps per class image.",
                rich_help_panel=_PRIOR,
                show_default=_default("class_image_steps"),
            ),
        ] = None,
        mixed_precision: Annotated[
            str | None,
            typer.Option(
                help="auto (bf16/fp16 on CUDA, none on CPU), no, fp16 or bf16.",
                rich_help_panel=_SPEED,
                show_default=_default("mixed_precision"),
            ),
        ] = None,
        gradient_checkpointing: Annotated[
            bool | None,
            typer.Option(
                "--gradient-checkpointing/--no-gradient-checkpointing",
                help="Less memory, ~30% slower.",
                rich_help_panel=_SPEED,
                show_default="off",
            ),
        ] = None,
        use_8bit_adam: Annotated[
            bool | None,
            typer.Option(
                "--use-8bit-adam/--no-8bit-adam",
                help="8-bit AdamW (needs bitsandbytes, CUDA).",
                rich_help_panel=_SPEED,
                show_default="off",
            ),
        ] = None,
        attention: Annotated[
            str | None,
            typer.Option(
                help="sdpa (PyTorch) or xformers (needs xformers and CUDA).",
                rich_help_panel=_SPEED,
                show_default=_default("attention"),
            ),
        ] = None,
        cache_latents: Annotated[
            bool | None,
            typer.Option(
                "--cache-latents/--no-cache-latents",
                help="Encode photos once instead of every step.",
                rich_help_panel=_SPEED,
                show_default="on",
            ),
        ] = None,
        checkpointing_steps: Annotated[
            int | None,
            typer.Option(
                help="Save a resumable checkpoint every N steps.",
                rich_help_panel=_CKPT,
                show_default=_default("checkpointing_steps"),
            ),
        ] = None,
        checkpoints_total_limit: Annotated[
            int | None,
            typer.Option(
                help="Checkpoints kept (the newest).",
                rich_help_panel=_CKPT,
                show_default=_default("checkpoints_total_limit"),
            ),
        ] = None,
        resume: Annotated[
            str,
            typer.Option(
                help="auto: continue from the newest checkpoint if any; latest: must continue; "
                "never: start over (deletes old checkpoints); or a checkpoint folder.",
                rich_help_panel=_CKPT,
            ),
        ] = "auto",
        sample_prompt: Annotated[
            str | None,
            typer.Option(
                help="Prompt of the samples made after training.",
                rich_help_panel=_SAMPLE,
                show_default="the instance prompt",
            ),
        ] = None,
        sample_negative_prompt: Annotated[
            str | None, typer.Option(help="Negative prompt of the samples.", rich_help_panel=_SAMPLE)
        ] = None,
        num_samples: Annotated[
            int | None,
            typer.Option(
                help="Sample images (0: none).", rich_help_panel=_SAMPLE, show_default=_default("num_samples")
            ),
        ] = None,
        sample_steps: Annotated[
            int | None,
            typer.Option(
                help="Inference steps per sample.",
                rich_help_panel=_SAMPLE,
                show_default=_default("sample_steps"),
            ),
        ] = None,
        sample_guidance_scale: Annotated[
            float | None,
            typer.Option(
                help="Guidance scale of the samples.",
                rich_help_panel=_SAMPLE,
                show_default=_default("sample_guidance_scale"),
            ),
        ] = None,
        sample_seed: Annotated[
            int | None,
            typer.Option(
                help="Seed of the first sample (+1 for each next).",
                rich_help_panel=_SAMPLE,
                show_default="--seed",
            ),
        ] = None,
        export_format: Annotated[
            str | None,
            typer.Option(
                help="safetensors or ckpt (pickle: only for old tools).",
                rich_help_panel=_EXPORT,
                show_default=_default("export_format"),
            ),
        ] = None,
        export_half: Annotated[
            bool | None,
            typer.Option(
                "--export-half/--export-full",
                help="fp16 (half the size) or fp32 single file.",
                rich_help_panel=_EXPORT,
                show_default="half",
            ),
        ] = None,
        hub_repo: Annotated[
            str | None,
            typer.Option(
                help="Publish to this Hub repo (owner/name); token from HF_TOKEN or `hf auth login`.",
                rich_help_panel=_EXPORT,
                show_default=False,
            ),
        ] = None,
        hub_private: Annotated[
            bool | None,
            typer.Option(
                "--private/--public",
                help="Visibility of a new Hub repo.",
                rich_help_panel=_EXPORT,
                show_default="private",
            ),
        ] = None,
    ) -> None:
        _quiet_libraries()
        with _errors():
            run_config = build_config(
                config,
                base_model=base_model,
                instance_dir=instance_dir,
                instance_prompt=instance_prompt,
                class_prompt=class_prompt,
                class_dir=class_dir,
                output_dir=output,
                resolution=resolution,
                max_train_steps=max_train_steps,
                learning_rate=learning_rate,
                lr_scheduler=lr_scheduler,
                lr_warmup_steps=lr_warmup_steps,
                train_batch_size=train_batch_size,
                gradient_accumulation_steps=gradient_accumulation_steps,
                train_text_encoder=train_text_encoder,
                noise_offset=noise_offset,
                seed=seed,
                with_prior_preservation=prior_preservation,
                prior_loss_weight=prior_loss_weight,
                num_class_images=num_class_images,
                class_batch_size=class_batch_size,
                class_image_steps=class_image_steps,
                mixed_precision=mixed_precision,
                gradient_checkpointing=gradient_checkpointing,
                use_8bit_adam=use_8bit_adam,
                attention=attention,
                cache_latents=cache_latents,
                checkpointing_steps=checkpointing_steps,
                checkpoints_total_limit=checkpoints_total_limit,
                sample_prompt=sample_prompt,
                sample_negative_prompt=sample_negative_prompt,
                num_samples=num_samples,
                sample_steps=sample_steps,
                sample_guidance_scale=sample_guidance_scale,
                sample_seed=sample_seed,
                export_format=export_format,
                export_half=export_half,
                hub_repo=hub_repo,
                hub_private=hub_private,
            )
            from trainer.run import run

            result = run(run_config, resume=resume, until=until)
        out = result.record.output_dir
        console.print(f"[green]Done.[/] Model: {out / 'model'}")
        if result.samples:
            console.print(f"Samples: {result.samples.grid.parent}")
        if result.export_path:
            console.print(f"Single file: {result.export_path}")
        if result.hub_url:
            console.print(f"Hub: {result.hub_url}")

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
        str | None, typer.Option(help="Take the resolution from this model.", show_default=False)
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Run config file.", show_default=False)
    ] = None,
) -> None:
    """Check photos before training: every unusable file is listed at once, with the fix."""
    from trainer.photos import check_photos

    with _errors():
        data = load_config_file(config) if config else {}
        base = base_model or data.get("base_model")
        res = resolution or data.get("resolution")
        if res is None and base:
            _quiet_libraries()
            from trainer.run import inspect_base_model

            res = inspect_base_model(str(base)).resolution
        res = int(res or 512)
        dirs = list(folders or [])
        if not dirs:
            dirs = [Path(c["instance_dir"]) for c in data.get("concepts", []) if isinstance(c, dict)]
        if not dirs:
            raise ConfigError("Give photo folders (sdtrain check photos/) or a --config with concepts.")
        checks = check_photos(dirs, resolution=res)
        for result in checks:
            table = Table(title=f"{result.folder} ({len(result.photos)} photos, {res} px training size)")
            table.add_column("photo")
            table.add_column("size", justify="right")
            table.add_column("format")
            table.add_column("notes")
            for photo in result.photos:
                table.add_row(
                    escape(photo.path.name),
                    f"{photo.width}x{photo.height}",
                    photo.format,
                    ", ".join(photo.notes),
                )
            console.print(table)
            for warning in result.warnings:
                console.print(f"[yellow]Warning:[/] {escape(warning)}")
        total = sum(len(c.photos) for c in checks)
        console.print(f"[green]All {total} photos are usable.[/]")


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
    """A run folder stands for its ``model/``; anything else is passed through."""
    path = Path(model)
    if (path / "run.json").is_file() and (path / "model" / "model_index.json").is_file():
        return str(path / "model")
    return model


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
        from trainer.sample import generate_samples

        result = generate_samples(
            _model_dir(model),
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
        "  sdtrain export --merge runs/me-lora    (base + adapter fused, one file)"
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
) -> None:
    """Export a fine-tuned model to one original-layout checkpoint (A1111, ComfyUI)."""
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
            )
            console.print(f"[green]Exported[/] {path} (adapter fused into its base)")
            return
        model_dir = Path(_model_dir(str(model)))
        if output is None:
            if model_dir == model:
                raise ConfigError(f"Give --output for {model} (only a run folder has a default export path).")
            output = model / "export" / "model.safetensors"
        from trainer.export import export_single_file

        path = export_single_file(model_dir, output, half=half, verify=verify)
        console.print(f"[green]Exported[/] {path}")


@app.command(
    epilog=(
        "Examples:\n\n  hf auth login && sdtrain publish runs/me me/sd-me\n\n"
        "  sdtrain publish runs/me --public          (repo from run.json's hub_repo)\n\n"
        "The token comes from HF_TOKEN or `hf auth login`; it is never a flag."
    ),
)
def publish(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (model/, export/, samples/, run.json).")],
    repo_id: Annotated[
        str | None, typer.Argument(help="owner/name.", show_default="run.json's hub_repo")
    ] = None,
    private: Annotated[bool, typer.Option("--private/--public", help="Visibility of a new repo.")] = True,
) -> None:
    """Upload a run (model, single file, samples, model card) to a Hugging Face Hub repo."""
    with _errors():
        record = RunRecord.read(run_dir / "run.json")
        repo = repo_id or record.hub_repo
        if not repo:
            raise ConfigError("Give the repo id: sdtrain publish RUN_DIR owner/name.")
        from trainer.publish import publish_run

        url = publish_run(run_dir, repo, private=private)
        console.print(f"[green]Published[/] {url}")


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
) -> None:
    """Serve a model over the text-to-image protocol (what SDClient and the proxy speak)."""
    _quiet_libraries()
    with _errors():
        from trainer.serve import serve as serve_model

        serve_model(_model_dir(model), host=host, port=port, model_id=model_id, config=config)


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
        str, typer.Option(help="sd1 (epsilon), sd2 (v-prediction) or sdxl (two text encoders).")
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
