"""The training loop: targets for both prediction types, the loss, data order, class images, options."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from trainer.checkpoints import find_checkpoints
from trainer.class_images import ensure_class_images, existing_class_images
from trainer.config import RunRecord, build_config
from trainer.errors import MissingDependency, TrainingError
from trainer.run import PreparedRun, make_class_images, prepare_run, training_data
from trainer.sample import read_png_text
from trainer.train import (
    batch_positions,
    dreambooth_loss,
    preflight,
    train,
    training_target,
)

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _prepared(base: Path, photos: Path, out: Path, **options: Any) -> PreparedRun:
    config = build_config(
        base_model=str(base),
        instance_dir=photos,
        instance_prompt="a photo of sks toy",
        class_prompt="a photo of a toy",
        output_dir=out,
        **{"num_class_images": 2, "class_image_steps": 2, "class_batch_size": 2, **options},
    )
    return prepare_run(config)


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# -- the target and the loss --------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_training_target_follows_the_prediction_type(request: pytest.FixtureRequest, variant: str) -> None:
    base = Path(request.getfixturevalue(f"tiny_{variant}"))
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    noise = torch.randn((2, 4, 8, 8), generator=generator)
    timesteps = torch.tensor([10, 900])
    target = training_target(scheduler, latents, noise, timesteps)
    if variant == "sd1":
        assert scheduler.config.prediction_type == "epsilon"
        assert torch.equal(target, noise)
    else:
        assert scheduler.config.prediction_type == "v_prediction"
        assert torch.allclose(target, scheduler.get_velocity(latents, noise, timesteps))
        # v = alpha_t * noise - sigma_t * x0: by hand for the first sample.
        alpha_bar = scheduler.alphas_cumprod[10]
        by_hand = alpha_bar.sqrt() * noise[0] - (1 - alpha_bar).sqrt() * latents[0]
        assert torch.allclose(target[0], by_hand, atol=1e-6)
        assert not torch.allclose(target, noise)


def test_unsupported_prediction_type_is_refused(tiny_sd1: Path) -> None:
    scheduler = DDPMScheduler.from_pretrained(tiny_sd1, subfolder="scheduler", prediction_type="sample")
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(TrainingError, match="'sample'; only 'epsilon' and 'v_prediction'"):
        training_target(scheduler, x, x, torch.tensor([1]))


def test_prior_preservation_loss_is_instance_plus_weighted_class_mse() -> None:
    pred = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # row 0: instance, row 1: class
    target = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    assert float(dreambooth_loss(pred, target, prior_preservation=False)) == pytest.approx(
        (1 + 1 + 4 + 4) / 4
    )
    assert float(
        dreambooth_loss(pred, target, prior_preservation=True, prior_loss_weight=0.5)
    ) == pytest.approx(1.0 + 0.5 * 4.0)
    half = dreambooth_loss(pred.half(), target.half(), prior_preservation=True)
    assert half.dtype == torch.float32  # computed in fp32 even under mixed precision


# -- data order -----------------------------------------------------------------------------------


def test_every_epoch_is_a_seeded_permutation_tiled_by_the_processes() -> None:
    n, batch, procs = 7, 2, 2
    steps_per_epoch = 2  # ceil(7 / (2 * 2))
    for epoch in range(3):
        seen = [
            example
            for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
            for rank in range(procs)
            for _, _, example in batch_positions(
                step, seed=3, num_examples=n, batch_size=batch, num_processes=procs, process_index=rank
            )
        ]
        assert set(seen) == set(range(n))  # every example once (the last batch wraps around)
        assert len(seen) == 8
    one = [batch_positions(s, seed=3, num_examples=n, batch_size=1) for s in range(14)]
    assert one == [batch_positions(s, seed=3, num_examples=n, batch_size=1) for s in range(14)]
    assert one != [batch_positions(s, seed=4, num_examples=n, batch_size=1) for s in range(14)]
    assert [e for ((_, _, e),) in one[:7]] != [e for ((_, _, e),) in one[7:]]  # a new order each epoch


# -- class images -----------------------------------------------------------------------------


@pytest.mark.slow
def test_class_images_are_cached_and_only_missing_ones_made(
    tiny_sd1: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class_dir = tmp_path / "class"
    jobs = [("a photo of a toy", class_dir), ("a photo of a toy", class_dir)]  # listed twice: made once
    kwargs: dict[str, Any] = {"num_images": 3, "resolution": 64, "batch_size": 2, "num_inference_steps": 2}
    (first,) = ensure_class_images(jobs, base_model=tiny_sd1, seed=5, **kwargs)
    assert (first.generated, first.reused) == (3, 0)
    assert [p.name for p in existing_class_images(class_dir)] == ["00000.png", "00001.png", "00002.png"]
    assert read_png_text(class_dir / "00001.png")["prompt"] == "a photo of a toy"
    assert read_png_text(class_dir / "00001.png")["seed"] == "6"
    original = (class_dir / "00001.png").read_bytes()

    import trainer.loading

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the base model must not be loaded when the cache is complete")

    monkeypatch.setattr(trainer.loading, "load_pipeline", no_loading)
    (second,) = ensure_class_images(jobs, base_model=tiny_sd1, seed=5, **kwargs)
    assert (second.generated, second.reused) == (0, 3)
    assert second.images == first.images
    monkeypatch.undo()

    (class_dir / "00001.png").unlink()
    (third,) = ensure_class_images(jobs, base_model=tiny_sd1, seed=5, **kwargs)
    assert (third.generated, third.reused) == (1, 2)
    # Image i is drawn with seed + i: the replacement gets the first free name, seed 5 + 3.
    assert read_png_text(class_dir / "00003.png")["seed"] == "8"
    assert (class_dir / "00001.png").exists() is False
    assert len(existing_class_images(class_dir)) == 3
    assert original  # the cache is plain PNG files a user can inspect


# -- training runs ------------------------------------------------------------------------------


@pytest.mark.slow
def test_shared_run_trained_with_prior_preservation(trained_run: Path, tiny_sd1: Path) -> None:
    record = RunRecord.read(trained_run / "run.json")
    assert record.with_prior_preservation and record.max_train_steps == 10 and record.resolution == 64
    assert len(existing_class_images(record.concepts[0].class_dir or Path("-"))) == 4
    trained = load_file(trained_run / "model" / UNET_WEIGHTS)
    base = load_file(tiny_sd1 / UNET_WEIGHTS)
    assert _max_abs_diff(trained, base) > 1e-4  # the UNet learnt something
    assert all(torch.isfinite(t).all() for t in trained.values())
    # Text encoder frozen by default: saved unchanged.
    te_base = load_file(tiny_sd1 / "text_encoder" / "model.safetensors")
    te_trained = load_file(trained_run / "model" / "text_encoder" / "model.safetensors")
    assert _max_abs_diff(te_trained, te_base) == 0
    # Checkpoints every 4 steps, only the newest kept, nothing half-written left.
    assert [step for step, _ in find_checkpoints(trained_run / "checkpoints")] == [8]
    assert not list((trained_run / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_v_prediction_with_text_encoder_accumulation_and_checkpointing(
    tiny_sd2: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    prepared = _prepared(
        tiny_sd2,
        photos,
        out,
        method="full",
        max_train_steps=2,
        with_prior_preservation=False,
        train_text_encoder=True,
        cache_latents=False,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        noise_offset=0.1,
        learning_rate=1e-3,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=1,
    )
    record = prepared.record
    assert record.prediction_type == "v_prediction"
    result = train(record, training_data(record, prepared.checks))
    assert result.global_step == 2 and result.last_loss is not None and np.isfinite(result.last_loss)
    assert len(result.step_times) == 2
    model = out / "model"
    assert DDPMScheduler.load_config(model, subfolder="scheduler")["prediction_type"] == "v_prediction"
    te_base = load_file(tiny_sd2 / "text_encoder" / "model.safetensors")
    te_trained = load_file(model / "text_encoder" / "model.safetensors")
    assert _max_abs_diff(te_trained, te_base) > 0  # the text encoder was trained too
    assert (model / "tokenizer" / "vocab.json").is_file()  # classic tokenizer files kept


# -- options that cannot run here, and resuming errors ------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"attention": "xformers"}, MissingDependency, "xformers"),
        ({"use_8bit_adam": True}, MissingDependency, "bitsandbytes"),
        ({"mixed_precision": "fp16"}, TrainingError, "fp16 mixed precision needs a CUDA GPU"),
    ],
)
def test_unusable_options_fail_before_anything_slow(
    tiny_sd1: Path,
    photos: Path,
    tmp_path: Path,
    options: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    if torch.cuda.is_available():
        pytest.skip("these options can run on this machine")
    record = _prepared(tiny_sd1, photos, tmp_path / "run", **options).record
    with pytest.raises(error, match=message):
        preflight(record)


@pytest.mark.slow
def test_resume_refuses_other_settings_and_missing_checkpoints(
    trained_run: Path, tiny_sd1: Path, session_photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(trained_run / "checkpoints", out / "checkpoints")
    shared = RunRecord.read(trained_run / "run.json")
    record = shared.model_copy(update={"output_dir": out, "learning_rate": 3e-4})
    data = training_data(record, prepare_run(record).checks)
    with pytest.raises(TrainingError, match=r"other settings \(learning_rate: 0.0001 -> 0.0003\)"):
        train(record, data, resume="auto")
    empty = shared.model_copy(update={"output_dir": tmp_path / "empty"})
    with pytest.raises(TrainingError, match="--resume latest: there is no checkpoint"):
        train(empty, data, resume="latest")
    with pytest.raises(TrainingError, match="not a checkpoint folder"):
        train(empty, data, resume=str(tmp_path))


@pytest.mark.slow
def test_make_class_images_skips_without_prior_preservation(
    tiny_sd1: Path, photos: Path, tmp_path: Path
) -> None:
    prepared = _prepared(tiny_sd1, photos, tmp_path / "run", with_prior_preservation=False)
    assert make_class_images(prepared.record) == []
    assert training_data(prepared.record, prepared.checks).class_images == [[]]
