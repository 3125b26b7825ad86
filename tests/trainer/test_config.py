"""Run configuration: flags over file over defaults, clear errors naming the field, the steps rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_LORA_LEARNING_RATE,
    RunConfig,
    RunRecord,
    build_config,
    default_max_train_steps,
    format_validation_error,
    slugify,
)
from trainer.errors import ConfigError

# The fields the publisher reads from run.json (the contract between run and publish).
PUBLISHER_KEYS = {
    "base_model",
    "base_model_license",
    "concepts",
    "resolution",
    "max_train_steps",
    "train_text_encoder",
    "learning_rate",
    "seed",
    "prediction_type",
    "sample_prompt",
    "mixed_precision",
    "with_prior_preservation",
    "num_class_images",
}


def _flags(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {
        "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "instance_dir": tmp_path / "photos",
        "instance_prompt": "photo of sks man",
        "class_prompt": "photo of a man",
        "output_dir": tmp_path / "out",
        **extra,
    }


@pytest.mark.parametrize(
    ("photos", "steps"), [(1, 200), (4, 500), (9, 1000), (10, 1000), (15, 1500), (25, 2500)]
)
def test_default_steps_rule(photos: int, steps: int) -> None:
    assert default_max_train_steps(photos) == steps == default_max_train_steps(photos, "sdxl")
    assert default_max_train_steps(photos, "flux") == 1000  # a FLUX LoRA: whatever the photos


def test_defaults(tmp_path: Path) -> None:
    config = build_config(**_flags(tmp_path))
    assert config.method == "lora" and config.learning_rate == DEFAULT_LORA_LEARNING_RATE == 1e-4
    assert config.lora_rank == config.lora_alpha == 16 and config.lora_target_modules == [
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
    ]
    assert build_config(**_flags(tmp_path, method="full")).learning_rate == DEFAULT_LEARNING_RATE == 5e-6
    assert config.resolution is None and config.max_train_steps is None  # derived later
    assert config.with_prior_preservation is None and config.num_class_images == 200  # per base, later
    assert config.mixed_precision == "auto" and config.attention == "sdpa"
    assert config.lr_scheduler == "constant" and config.num_samples == 4
    # Derived from the base model: 50 steps at 7.5 for SD/SDXL, 28 at 3.5 for FLUX.
    assert config.sample_steps is None and config.sample_guidance_scale is None
    (concept,) = config.resolved_concepts()
    assert concept.class_dir == tmp_path / "out" / "class_images" / "photo-of-a-man"


def test_toml_file_with_several_concepts_and_relative_paths(tmp_path: Path) -> None:
    file = tmp_path / "cfg" / "run.toml"
    file.parent.mkdir()
    file.write_text(
        """
base_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
output_dir = "runs/me"
learning_rate = 2e-6
max_train_steps = 800
train_text_encoder = true

[[concepts]]
instance_prompt = "photo of sks man"
class_prompt = "photo of a man"
instance_dir = "photos/me"
class_dir = "class/man"

[[concepts]]
instance_prompt = "photo of zwx dog"
class_prompt = "photo of a dog"
instance_dir = "photos/dog"
""",
        encoding="utf-8",
    )
    config = build_config(file, learning_rate=None, max_train_steps=1200)  # None = flag not given
    base = file.parent.resolve()
    assert config.learning_rate == 2e-6  # from the file
    assert config.max_train_steps == 1200  # the flag wins
    assert config.train_text_encoder is True
    assert config.output_dir == base / "runs" / "me"
    assert [c.instance_dir for c in config.concepts] == [base / "photos/me", base / "photos/dog"]
    resolved = config.resolved_concepts()
    assert resolved[0].class_dir == base / "class" / "man"
    assert resolved[1].class_dir == base / "runs" / "me" / "class_images" / "photo-of-a-dog"


def test_yaml_file_and_concept_flags_override_its_only_concept(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text(
        "base_model: base\n"
        "output_dir: out\n"
        "concepts:\n"
        "  - instance_prompt: photo of sks man\n"
        "    class_prompt: photo of a man\n"
        "    instance_dir: photos\n",
        encoding="utf-8",
    )
    (tmp_path / "base").mkdir()  # an existing folder next to the file: made absolute
    config = build_config(file, instance_prompt="photo of ohwx man")
    assert config.base_model == str(tmp_path.resolve() / "base")
    (concept,) = config.concepts
    assert concept.instance_prompt == "photo of ohwx man"
    assert concept.class_prompt == "photo of a man"
    assert concept.instance_dir == tmp_path.resolve() / "photos"


def test_hub_id_base_model_is_not_made_a_path(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text('base_model = "owner/model"\noutput_dir = "o"\n', encoding="utf-8")
    config = build_config(file, instance_dir=tmp_path, instance_prompt="x", class_prompt="y")
    assert config.base_model == "owner/model"


def test_concept_flags_refused_with_several_concepts(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text(
        'base_model = "a/b"\noutput_dir = "o"\n'
        '[[concepts]]\ninstance_prompt = "x"\ninstance_dir = "p"\nclass_prompt = "c"\n'
        '[[concepts]]\ninstance_prompt = "y"\ninstance_dir = "q"\nclass_prompt = "d"\n',
        encoding="utf-8",
    )
    with pytest.raises(
        ConfigError, match="defines 2 concepts; --instance-prompt can only change a run with one"
    ):
        build_config(file, instance_prompt="z")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"learning_rate": -1.0}, "learning_rate: Input should be greater than 0 (got -1.0)"),
        ({"resolution": 500}, "resolution: must be a multiple of 8 (the VAE downsamples by 8), e.g. 496"),
        ({"resolution": 32}, "resolution: Input should be greater than or equal to 64"),
        ({"mixed_precision": "fp8"}, "mixed_precision: Input should be 'auto', 'no', 'fp16' or 'bf16'"),
        ({"hub_repo": "not a repo"}, "hub_repo: must look like 'owner/name'"),
        (
            {"class_prompt": None, "instance_prompt": "x", "with_prior_preservation": True},
            "concepts[0].class_prompt is required with prior",
        ),
        ({"instance_prompt": ""}, "concepts[0].instance_prompt: String should have at least 1 character"),
        ({"lr_warmup_steps": 100}, "lr_warmup_steps needs lr_scheduler 'constant_with_warmup'"),
        ({"max_train_steps": 0}, "max_train_steps: Input should be greater than or equal to 1"),
    ],
)
def test_invalid_values_name_the_field(tmp_path: Path, extra: dict[str, object], expected: str) -> None:
    flags = _flags(tmp_path, **extra)
    if extra.get("class_prompt", "") is None:
        flags.pop("class_prompt")
    with pytest.raises(ConfigError) as info:
        build_config(**flags)
    assert expected in str(info.value)
    assert str(info.value).startswith("Invalid options:")


def test_unknown_and_missing_keys_in_a_file(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text(
        'base_model = "a/b"\nlearning_rat = 1e-6\n[[concepts]]\ninstance_dir = "p"\n', encoding="utf-8"
    )
    with pytest.raises(ConfigError) as info:
        build_config(file)
    message = str(info.value)
    assert f"Invalid configuration ({file} and flags)" in message
    assert "learning_rat: is not an option" in message
    assert "output_dir: is required" in message
    assert "concepts[0].instance_prompt: is required" in message


def test_missing_concept_hints_at_the_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give --instance-dir and --instance-prompt"):
        build_config(base_model="a/b", output_dir=tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("run.toml", "base_model = ", "is not valid TOML"),
        ("run.yaml", "base_model: [unclosed", "is not valid YAML"),
        ("run.yaml", "- a\n- b\n", "must hold a table of options"),
        ("run.json", "{}", "must end in .toml, .yaml or .yml"),
    ],
)
def test_bad_config_files(tmp_path: Path, name: str, content: str, expected: str) -> None:
    file = tmp_path / name
    file.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=expected):
        build_config(file)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(tmp_path / "nope.toml")


def test_class_dir_shared_by_two_prompts_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shared by two class prompts"):
        build_config(
            base_model="a/b",
            output_dir=tmp_path,
            concepts=[
                {"instance_prompt": "x", "instance_dir": "p", "class_prompt": "a man", "class_dir": "c"},
                {"instance_prompt": "y", "instance_dir": "q", "class_prompt": "a dog", "class_dir": "c"},
            ],
        )


def test_run_record_round_trips_and_holds_what_the_publisher_reads(tmp_path: Path) -> None:
    config = build_config(**_flags(tmp_path))
    data = config.model_dump()
    data.update(
        concepts=[c.model_dump() for c in config.resolved_concepts()],
        resolution=512,
        max_train_steps=500,
        mixed_precision="no",
        sample_prompt="photo of sks man",
        sample_seed=config.seed,
        prediction_type="epsilon",
        base_model_license="creativeml-openrail-m",
    )
    record = RunRecord.model_validate(data)
    path = record.write(tmp_path / "run.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert PUBLISHER_KEYS <= raw.keys()
    assert set(raw["concepts"][0]) == {"instance_prompt", "class_prompt", "instance_dir", "class_dir"}
    assert raw["base_model_license"] == "creativeml-openrail-m"
    assert RunRecord.read(path) == record
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically, nothing left behind
    fingerprint = record.training_fingerprint()
    assert "max_train_steps" not in fingerprint and fingerprint["learning_rate"] == 1e-4
    assert fingerprint["method"] == "lora" and fingerprint["lora_rank"] == 16


def test_run_record_read_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the output folder of a run"):
        RunRecord.read(tmp_path / "run.json")
    (tmp_path / "run.json").write_text('{"base_model": "x"}', encoding="utf-8")
    with pytest.raises(ConfigError, match="concepts: is required"):
        RunRecord.read(tmp_path / "run.json")


def test_format_validation_error_without_file() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        RunConfig.model_validate({"base_model": "a/b"})
    assert format_validation_error(info.value).startswith("Invalid configuration:\n  - concepts: is required")


def test_slugify() -> None:
    assert slugify("A photo of a Man!") == "a-photo-of-a-man"
    assert slugify("???") == "class"
