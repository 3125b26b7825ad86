"""``--quantize-base``: FLUX LoRA on a quantized transformer (QLoRA-style).

The refusals are tested with the back-ends made absent (CI installs neither bitsandbytes nor
torchao); the int8 run itself needs torchao and is skipped without it.
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import load_file
from test_flux import PROMPT, WITH_TWO_CLASS_IMAGES, flux_args, flux_image
from typer.testing import CliRunner

from trainer.checkpoints import check_fingerprint
from trainer.cli import app
from trainer.config import RunRecord
from trainer.errors import MissingDependency, TrainingError
from trainer.lora_files import KOHYA_WEIGHTS, LORA_DIR, LORA_WEIGHTS
from trainer.quantize import QUANTIZE_BACKENDS, check_quantize_base

torch = pytest.importorskip("torch")


def absent(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``package`` uninstalled for this test: ``find_spec`` finds nothing, ``import`` fails."""
    monkeypatch.setitem(sys.modules, package, None)


def present(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``package`` look installed to ``find_spec`` (an empty module)."""
    module = types.ModuleType(package)
    module.__spec__ = importlib.machinery.ModuleSpec(package, None)
    monkeypatch.setitem(sys.modules, package, module)


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_missing_back_end_says_what_to_install(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    package = QUANTIZE_BACKENDS[kind]
    absent(monkeypatch, package)
    with pytest.raises(MissingDependency) as caught:
        check_quantize_base(kind, cuda=True)  # type: ignore[arg-type]
    message = str(caught.value)
    assert f"needs the {package} package" in message and "pip install 'sdclient[gpu]'" in message
    assert "leave the option off" in message


def test_nf4_without_cuda_says_it_needs_a_cuda_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    present(monkeypatch, "bitsandbytes")  # installed or not, the GPU is what is missing
    with pytest.raises(MissingDependency, match="needs a CUDA GPU"):
        check_quantize_base("nf4", cuda=False)
    check_quantize_base("none", cuda=False)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_the_command_refuses_a_missing_back_end_before_loading_anything(
    kind: str, tiny_flux: Path, flux_photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.train

    absent(monkeypatch, QUANTIZE_BACKENDS[kind])
    monkeypatch.setattr(trainer.train, "_cuda_available", lambda: True)

    def must_not_train(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr(trainer.train, "train", must_not_train)
    out = tmp_path / "run"
    args = ["train", *flux_args(tiny_flux, flux_photos, out), "--quantize-base", kind]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "pip install 'sdclient[gpu]'" in one_line(result.output)
    assert not (out / "run.json").exists()


def test_nf4_on_a_machine_without_cuda_is_refused(
    tiny_flux: Path, flux_photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.train

    monkeypatch.setattr(trainer.train, "_cuda_available", lambda: False)
    args = ["train", *flux_args(tiny_flux, flux_photos, tmp_path / "run"), "--quantize-base", "nf4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert "--quantize-base nf4 needs a CUDA GPU" in one_line(result.output)


def test_an_sd_base_refuses_the_option(tiny_sd1: Path, photos: Path, tmp_path: Path) -> None:
    args = ["--base-model", str(tiny_sd1), "--instance-dir", str(photos), "--instance-prompt", PROMPT]
    args += ["--output", str(tmp_path / "run"), "--method", "lora", "--no-prior-preservation"]
    result = CliRunner().invoke(app, ["train", *args, "--quantize-base", "int8"])
    assert result.exit_code != 0
    assert "--quantize-base int8 is for FLUX bases" in one_line(result.output)


def flux_record(tmp_path: Path, **options: object) -> RunRecord:
    concept = {"instance_dir": str(tmp_path), "instance_prompt": PROMPT}
    return RunRecord.model_validate(
        {
            "base_model": "black-forest-labs/FLUX.1-dev",
            "concepts": [concept],
            "output_dir": str(tmp_path / "out"),
            "resolution": 512,
            "max_train_steps": 10,
            "mixed_precision": "bf16",
            "sample_prompt": PROMPT,
            "sample_seed": 0,
            "architecture": "flux",
            "with_prior_preservation": False,
            **options,
        }
    )


def write_checkpoint(folder: Path, fingerprint: dict[str, object]) -> Path:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"fingerprint": fingerprint}), encoding="utf-8")
    return folder


def test_resume_refuses_another_quantize_base(tmp_path: Path) -> None:
    quantized = flux_record(tmp_path, quantize_base="int8")
    checkpoint = write_checkpoint(tmp_path / "checkpoint-2", quantized.training_fingerprint())
    check_fingerprint(checkpoint, quantized)
    with pytest.raises(TrainingError, match=r"quantize_base: 'int8' -> 'none'"):
        check_fingerprint(checkpoint, flux_record(tmp_path))


def test_a_checkpoint_from_before_the_option_resumes_unquantized(tmp_path: Path) -> None:
    plain = flux_record(tmp_path)
    older = {k: v for k, v in plain.training_fingerprint().items() if k != "quantize_base"}
    checkpoint = write_checkpoint(tmp_path / "checkpoint-2", older)
    check_fingerprint(checkpoint, plain)
    with pytest.raises(TrainingError, match=r"quantize_base: 'none' -> 'int8'"):
        check_fingerprint(checkpoint, flux_record(tmp_path, quantize_base="int8"))


@pytest.mark.slow
def test_an_int8_run_trains_an_adapter_for_the_full_precision_base(
    tiny_flux: Path, flux_photos: Path, tmp_path: Path
) -> None:
    pytest.importorskip("torchao")

    runs = {}
    for kind in ("none", "int8"):
        out = tmp_path / kind
        args = [*flux_args(tiny_flux, flux_photos, out), "--quantize-base", kind]
        result = CliRunner().invoke(app, ["run", *args])
        assert result.exit_code == 0, result.output
        losses = [float(x) for x in re.findall(r"loss (\d+\.\d+|nan|inf)", result.output)]
        assert losses and all(math.isfinite(x) for x in losses), result.output
        runs[kind] = out
    quantized = runs["int8"]
    assert json.loads((quantized / "run.json").read_text(encoding="utf-8"))["quantize_base"] == "int8"
    assert len(list((quantized / "samples").glob("sample-*.png"))) == 1  # sampled on the int8 base

    for name in (LORA_WEIGHTS, KOHYA_WEIGHTS):  # both files: the keys and shapes of an unquantized run
        plain, adapter = load_file(runs["none"] / LORA_DIR / name), load_file(quantized / LORA_DIR / name)
        assert {k: v.shape for k, v in adapter.items()} == {k: v.shape for k, v in plain.items()}
        assert all(torch.isfinite(v).all() for v in adapter.values())
    adapter = load_file(quantized / LORA_DIR / LORA_WEIGHTS)
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b), "lora_B starts at zero: it trained"

    base, adapted = flux_image(tiny_flux), flux_image(tiny_flux, quantized / LORA_DIR)  # unquantized base
    assert np.abs(base - adapted).max() > 1e-3, "the adapter does not change the image"


def test_int8_holds_torchao_weights_that_peft_puts_a_lora_on(tiny_flux: Path) -> None:
    pytest.importorskip("torchao")
    from peft import LoraConfig
    from torchao.quantization import Int8Tensor

    from trainer.quantize import load_quantized_transformer, prepare_quantized_for_training

    transformer = load_quantized_transformer(str(tiny_flux), "int8", torch.float32)
    prepare_quantized_for_training(transformer, "int8", torch.device("cpu"))
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    layer = transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer.base_layer.weight, Int8Tensor)
    assert type(layer).__name__ == "TorchaoLoraLinear"
    trainable = [n for n, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_int8_in_memory_gives_the_layers_the_loader_gives(tiny_flux: Path) -> None:
    pytest.importorskip("torchao")
    from diffusers import FluxTransformer2DModel
    from torchao.quantization import Int8Tensor

    from trainer.quantize import load_quantized_transformer, quantize_in_memory

    def int8_layers(model: torch.nn.Module) -> set[str]:
        return {n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), Int8Tensor)}

    loaded = load_quantized_transformer(str(tiny_flux), "int8", torch.float32)
    built = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    quantize_in_memory(built, "int8", torch.float32)
    assert int8_layers(built) == int8_layers(loaded) and int8_layers(built)


@pytest.mark.slow
def test_an_int8_run_generates_its_class_images_on_the_int8_base(
    tiny_flux: Path, flux_photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torchao")
    import trainer.loading

    kinds: list[str] = []
    real = trainer.loading.load_pipeline

    def recording(*args: object, **kwargs: Any) -> Any:
        kinds.append(kwargs.get("quantize_base", "none"))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer.loading, "load_pipeline", recording)
    out = tmp_path / "run"
    args = [*flux_args(tiny_flux, flux_photos, out, "--max-train-steps", "2"), "--quantize-base", "int8"]
    args.remove("--no-prior-preservation")
    args += WITH_TWO_CLASS_IMAGES
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 0, result.output
    assert len(list((out / "class_images" / "a-photo-of-a-toy").glob("*.png"))) == 2
    assert kinds == ["int8", "int8"]  # the class images, then the samples
