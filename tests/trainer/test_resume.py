"""Crash safety: a run killed (SIGKILL) or stopped (SIGTERM) mid-training resumes to the same weights.

Each test starts ``python -m trainer.cli train`` in a subprocess with the options of the shared
trained run (same photos, class images and seed), interrupts it, resumes it in this process, and
compares the final UNet with the uninterrupted run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from trainer.checkpoints import find_checkpoints
from trainer.cli import app
from trainer.config import RunRecord

RunArgs = Callable[..., list[str]]
UNET = Path("model/unet/diffusion_pytorch_model.safetensors")
DEADLINE_S = 240.0

pytestmark = pytest.mark.slow


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer.cli", "train", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def _wait_for(condition: Callable[[], Any], proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {what} within {DEADLINE_S:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def args_for(
    trained_run: Path, tiny_sd1: Path, session_photos: Path, run_args: RunArgs
) -> Callable[..., list[str]]:
    """``train`` arguments of the shared run, into another folder, with overrides."""
    record = RunRecord.read(trained_run / "run.json")

    def make(out: Path, **overrides: object) -> list[str]:
        # The shared run's class images: same data, nothing to generate.
        return run_args(tiny_sd1, session_photos, out, class_dir=record.concepts[0].class_dir, **overrides)

    return make


def _assert_same_weights(run_a: Path, run_b: Path) -> None:
    a, b = load_file(run_a / UNET), load_file(run_b / UNET)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"


def _resume(args: list[str], resume: str) -> str:
    result = CliRunner().invoke(app, ["train", *args, "--resume", resume])
    assert result.exit_code == 0, result.output
    return result.output


def test_sigkill_after_a_checkpoint_then_resume_gives_the_same_weights(
    trained_run: Path, args_for: Callable[..., list[str]], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = args_for(out, checkpointing_steps=2, checkpoints_total_limit=3)
    log = tmp_path / "train.log"
    proc = _start(args, log)
    first = out / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    _wait_for(first.is_file, proc, log, "the first checkpoint")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (out / "model").exists(), "training finished before it could be killed"
    killed_at = [step for step, _ in find_checkpoints(out / "checkpoints")]
    assert killed_at and max(killed_at) < 10

    output = _resume(args, "latest")
    assert f"Resuming from {out / 'checkpoints' / f'checkpoint-{max(killed_at)}'}" in " ".join(output.split())
    assert not list((out / "checkpoints").glob(".tmp-*"))  # a half-written checkpoint is cleaned up
    _assert_same_weights(trained_run, out)


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(
    trained_run: Path, args_for: Callable[..., list[str]], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = args_for(out, checkpointing_steps=1000)
    log = tmp_path / "train.log"
    proc = _start(args, log)
    _wait_for(lambda: "Training 10 steps" in log.read_text(errors="replace"), proc, log, "the training loop")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=DEADLINE_S) == 128 + signal.SIGTERM
    text = " ".join(log.read_text(errors="replace").split())
    assert "Training stopped by SIGTERM at step" in text
    assert "Run the same command again to continue" in text
    ((step, checkpoint),) = find_checkpoints(out / "checkpoints")
    assert 1 <= step < 10 and f"saved in {checkpoint}" in text
    assert not (out / "model").exists()

    output = _resume(args, "auto")  # the default: continue when a checkpoint exists
    assert f"Resuming from {checkpoint} (step {step} of 10)" in " ".join(output.split())
    _assert_same_weights(trained_run, out)
