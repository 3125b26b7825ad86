"""The checkpoint lifecycle of a training run: find, save, check, resume, and stop on a signal.

A checkpoint is ``OUT/checkpoints/checkpoint-<step>``: accelerate's state (trained weights, optimizer,
LR scheduler, its RNGs), the loop's own generator per process (``training_rng_<process>.pt``) and
``trainer_state.json`` (the step and the settings it depends on, see
:meth:`~trainer.config.RunRecord.training_fingerprint`). It is written in a temporary folder and
renamed into place, so a crash leaves either no new checkpoint or a complete one; so does a full disk,
which stops the run with a :class:`~trainer.errors.StorageError` instead of a traceback. For a LoRA run it
holds only the adapter weights (``adapter_<n>.safetensors``, megabytes instead of the whole model).

A resumed run restores all of it and therefore ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from trainer._console import console, shown
from trainer._fs import TMP_PREFIX, disk_errors, publish_dir, tree_size
from trainer.config import RunRecord
from trainer.errors import TrainingError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

__all__ = [
    "CHECKPOINT_PREFIX",
    "StopSignal",
    "TrainingRNG",
    "check_fingerprint",
    "delete_checkpoints",
    "find_checkpoints",
    "resolve_resume",
    "save_adapters_only",
    "save_checkpoint",
    "stop_requested",
    "unwrap",
]

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_STATE_FILE = "trainer_state.json"
_ADAPTER_FILE = "adapter_{}.safetensors"


def find_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``checkpoints_dir``, oldest first, as ``(step, folder)``."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for entry in checkpoints_dir.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and (entry / _STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


class StopSignal:
    """Turns SIGINT/SIGTERM into a request to stop after the current step (a second Ctrl-C quits)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        self.signum = signum
        console.print(
            f"{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
            "(Ctrl-C again quits without saving)",
            style="yellow",
        )


class TrainingRNG:
    """The one random generator of the loop (noise, timesteps, latent sampling); checkpointed."""

    def __init__(self, seed: int, device: torch.device) -> None:
        import torch

        self.generator = torch.Generator(device).manual_seed(seed)

    def save(self, path: Path) -> None:
        import torch

        torch.save(self.generator.get_state(), path)

    def load(self, path: Path) -> None:
        import torch

        self.generator.set_state(torch.load(path, map_location="cpu", weights_only=True))


def resolve_resume(resume: str, checkpoints_dir: Path) -> Path | None:
    checkpoints = find_checkpoints(checkpoints_dir)
    if resume == "never":
        return None
    if resume in ("auto", "latest"):
        if checkpoints:
            return checkpoints[-1][1]
        if resume == "latest":
            raise TrainingError(
                f"--resume latest: there is no checkpoint in {checkpoints_dir}. Drop --resume to start "
                "from the beginning."
            )
        return None
    path = Path(resume)
    if not (path / _STATE_FILE).is_file():
        raise TrainingError(
            f"--resume {resume}: not a checkpoint folder (no {_STATE_FILE}); give `auto`, `latest`, "
            f"`never` or a folder such as {checkpoints_dir / (CHECKPOINT_PREFIX + '500')}."
        )
    return path


def delete_checkpoints(checkpoints_dir: Path) -> None:
    checkpoints = find_checkpoints(checkpoints_dir)
    if checkpoints:
        console.print(f"--resume never: deleting {len(checkpoints)} earlier checkpoint(s)", style="yellow")
    for _, path in checkpoints:
        shutil.rmtree(path)


# Settings the fingerprint gained after checkpoints were first written, with the value an older
# checkpoint (which does not name them) was trained with.
_FINGERPRINT_ADDED_LATER: dict[str, Any] = {"quantize_base": "none"}


def check_fingerprint(checkpoint: Path, record: RunRecord) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((checkpoint / _STATE_FILE).read_text(encoding="utf-8"))
    saved, now = state.get("fingerprint", {}), record.training_fingerprint()
    saved = {**_FINGERPRINT_ADDED_LATER, **saved}
    changed = [f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in now if saved.get(k) != now[k]]
    if changed:
        raise TrainingError(
            f"{checkpoint} was saved by a run with other settings ({'; '.join(changed)}). Run with the "
            "same settings to continue it, pass --resume never to start over, or choose another --output."
        )
    return state


def save_checkpoint(
    accelerator: Accelerator,
    checkpoints_dir: Path,
    step: int,
    record: RunRecord,
    rng: TrainingRNG,
) -> Path:
    """Save the complete training state as ``checkpoint-<step>``, atomically, and prune old ones.

    Every process writes into one temporary folder (its RNG state included); the main process
    then flushes it to disk and renames it into place, so a crash leaves either no new checkpoint
    or a complete one. Old checkpoints are pruned only after the new one is complete.

    Raises:
        StorageError: the disk is full, over its quota or failing. The temporary folder is removed
            and the previous checkpoint is untouched; the message says how much space is needed
            (the size of the previous checkpoint) and how to continue.
    """
    final = checkpoints_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = checkpoints_dir / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step}"  # same name on every process
    previous = find_checkpoints(checkpoints_dir)
    if previous:
        needed: int | None = tree_size(previous[-1][1])
        then = (
            f"The previous checkpoint, {shown(previous[-1][1])}, is intact: once there is room, run "
            "the same command again to continue from it."
        )
    else:
        needed, then = None, "Once there is room, run the same command again."
    with disk_errors(checkpoints_dir, final.name, needed=needed, then=then):
        try:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            rng.save(tmp / f"training_rng_{accelerator.process_index}.pt")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {
                    "global_step": step,
                    "max_train_steps": record.max_train_steps,
                    "num_processes": accelerator.num_processes,
                    "fingerprint": record.training_fingerprint(),
                }
                (tmp / _STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
                publish_dir(tmp, final)
        except BaseException:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
            raise
    if accelerator.is_main_process:
        for _, old in find_checkpoints(checkpoints_dir)[: -record.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def stop_requested(accelerator: Accelerator, stop: StopSignal) -> bool:
    """Whether any process got SIGINT/SIGTERM (all processes must agree before saving together)."""
    if accelerator.num_processes == 1:
        return stop.signum is not None
    import torch

    flag = torch.tensor([1.0 if stop.signum is not None else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="max").item() > 0)


def unwrap(accelerator: Accelerator, model: Any) -> Any:
    """The plain model inside accelerate's (DDP) and torch.compile's wrappers."""
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def save_adapters_only(accelerator: Accelerator) -> None:
    """Make accelerate's checkpoints hold only the LoRA adapters of the prepared models.

    The adapter weights are saved and restored exactly (PEFT's own state dict, fp32), one file per
    prepared model in the order accelerate prepared them; the frozen base weights are not saved.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            for index, model in enumerate(models):
                state = get_peft_model_state_dict(unwrap(accelerator, model))
                tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
                save_file(tensors, str(Path(output_dir) / _ADAPTER_FILE.format(index)))
        weights.clear()  # accelerate saves no whole model

    def load_hook(models: list[Any], input_dir: str) -> None:
        for index, model in enumerate(models):
            state = load_file(str(Path(input_dir) / _ADAPTER_FILE.format(index)))
            result: Any = set_peft_model_state_dict(unwrap(accelerator, model), state, adapter_name="default")
            unexpected = list(getattr(result, "unexpected_keys", None) or [])
            if unexpected:
                raise TrainingError(f"{input_dir} holds adapters of another model: {unexpected[:3]}")
        models.clear()  # accelerate loads no whole model

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
