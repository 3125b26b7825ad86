"""The adapter files of a LoRA run folder: where training writes them and export/publish read them.

```
OUT/lora/pytorch_lora_weights.safetensors        diffusers/PEFT keys (pipeline.load_lora_weights)
OUT/lora/pytorch_lora_weights_kohya.safetensors  kohya / A1111 / ComfyUI keys (lora_unet_..., lora_te...)
```

A LoRA run has no ``OUT/model``: the base model (run.json's ``base_model``) plus the adapter is
the model.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["KOHYA_WEIGHT_NAME", "LORA_DIR", "LORA_WEIGHT_NAME", "adapter_files", "is_lora_run"]

LORA_DIR = "lora"
# The name diffusers' save_lora_weights writes and load_lora_weights looks for (LORA_WEIGHT_NAME_SAFE).
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"


def is_lora_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a trained adapter (``lora/pytorch_lora_weights.safetensors``)."""
    return (Path(run_dir) / LORA_DIR / LORA_WEIGHT_NAME).is_file()


def adapter_files(run_dir: Path) -> list[Path]:
    """The run's adapter files that exist: the diffusers file first, then the kohya file."""
    folder = Path(run_dir) / LORA_DIR
    return [folder / name for name in (LORA_WEIGHT_NAME, KOHYA_WEIGHT_NAME) if (folder / name).is_file()]
