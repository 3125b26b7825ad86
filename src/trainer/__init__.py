"""DreamBooth fine-tuning of Stable Diffusion: photos in, a model to export, publish and serve out.

The command line is ``sdtrain`` (:mod:`trainer.cli`); the guide is ``docs/trainer.md``. The steps,
one module each:

- :mod:`trainer.config`: the options (``RunConfig``) and ``run.json`` (``RunRecord``)
- :mod:`trainer.photos`: checking and preparing the photos
- :mod:`trainer.class_images`: class images for prior preservation, cached
- :mod:`trainer.train`: the training loop (accelerate, checkpoints, resume)
- :mod:`trainer.sample`: sample images with their metadata
- :mod:`trainer.export`, :mod:`trainer.publish`, :mod:`trainer.serve`: after training
- :mod:`trainer.run`: all of them in order

Importing ``trainer`` is cheap: torch and diffusers load only when a step needs them.

Example:
    >>> from pathlib import Path
    >>> from trainer import build_config
    >>> config = build_config(
    ...     base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
    ...     instance_dir=Path("photos"),
    ...     instance_prompt="photo of sks man",
    ...     class_prompt="photo of a man",
    ...     output_dir=Path("runs/me"),
    ... )
    >>> config.method, config.learning_rate
    ('lora', 0.0001)

    Then ``trainer.run.run(config)`` does the whole flow.
"""

from trainer.config import RunConfig, RunRecord, build_config
from trainer.errors import (
    ConfigError,
    MissingDependency,
    PhotoError,
    StorageError,
    TrainerError,
    TrainingError,
    TrainingInterrupted,
)

__all__ = [
    "ConfigError",
    "MissingDependency",
    "PhotoError",
    "RunConfig",
    "RunRecord",
    "StorageError",
    "TrainerError",
    "TrainingError",
    "TrainingInterrupted",
    "build_config",
]
