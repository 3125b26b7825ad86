"""A full, over-quota or failing disk: one clear error, nothing half-written, the old state kept."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from trainer import _fs
from trainer._fs import TMP_PREFIX, atomic_write_bytes, disk_errors
from trainer.checkpoints import find_checkpoints
from trainer.cli import app
from trainer.errors import StorageError


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(f"{TMP_PREFIX}*")]


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (errno.ENOSPC, "the disk is full"),
        (errno.EDQUOT, "the disk quota is exceeded"),
        (errno.EIO, "the disk reported an input/output error"),
    ],
)
def test_a_failed_atomic_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, says: str
) -> None:
    target = atomic_write_bytes(tmp_path / "run.json", b"old")

    def fail(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(_fs.os, "fsync", fail)
    with pytest.raises(StorageError) as caught:
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []
    message = str(caught.value)
    assert f"Could not write run.json in {tmp_path}: {says}" in message
    assert "needs about 12 bytes" in message and "run.json is unchanged" in message
    assert caught.value.errno == code and caught.value.folder == tmp_path


def test_other_write_errors_pass_through(tmp_path: Path) -> None:
    with pytest.raises(PermissionError), disk_errors(tmp_path, "x"):
        raise PermissionError(errno.EACCES, "Permission denied")


def test_a_full_disk_reported_by_native_code_is_recognised(tmp_path: Path) -> None:
    class SafetensorError(Exception):  # safetensors reports the OS error in its own type, as text
        pass

    with pytest.raises(StorageError, match="the disk is full"), disk_errors(tmp_path, "adapter.safetensors"):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_torch_s_writer_failure_counts_as_a_full_disk_only_when_it_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch_failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    with pytest.raises(RuntimeError), disk_errors(tmp_path, "optimizer.bin"):
        raise torch_failure  # plenty of space here: a real bug, kept as it is
    monkeypatch.setattr(_fs, "_free_space", lambda folder: 1000)
    with pytest.raises(StorageError, match=r"the disk is full \(1.0 KB free\)"):
        with disk_errors(tmp_path, "optimizer.bin"):
            raise torch_failure


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_stops_cleanly_and_keeps_the_previous_one(
    tiny_sd1: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_args: Any
) -> None:
    import torch

    out = tmp_path / "run"
    args = run_args(
        tiny_sd1,
        photos,
        out,
        class_prompt=None,
        num_class_images=None,
        class_batch_size=None,
        class_image_steps=None,
        max_train_steps=9,
        checkpointing_steps=4,
        checkpoints_total_limit=1,
        no_prior_preservation=True,  # no class images to generate: the run is about checkpoints
    )
    real_save = torch.save

    def save_until_full(obj: Any, f: Any, *rest: Any, **kwargs: Any) -> None:
        if f"{TMP_PREFIX}checkpoint-8" in str(f):
            Path(f).write_bytes(b"\x00" * 100)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *rest, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", save_until_full)
        result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    checkpoints = out / "checkpoints"
    assert f"Could not write checkpoint-8 in {checkpoints}: the disk is full" in text
    assert "it needs about" in text and "--checkpoints-total-limit" in text and "--output" in text
    assert f"The previous checkpoint, {checkpoints / 'checkpoint-4'}, is intact" in text
    assert "Traceback" not in result.output
    assert [step for step, _ in find_checkpoints(checkpoints)] == [4]
    assert _leftovers(out) == [] and not (out / "model").exists()
    state = json.loads((checkpoints / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4

    # Room again: the same command continues from the kept checkpoint and finishes.
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    assert "Resuming from" in result.output and "checkpoint-4" in result.output
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
