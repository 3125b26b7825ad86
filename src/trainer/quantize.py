"""FLUX's frozen transformer held quantized while its LoRA trains (QLoRA-style, ``--quantize-base``).

Only the frozen base weights are quantized; the LoRA matrices train in fp32 on top of them, so the
adapter has the very keys and shapes of an unquantized run and applies to the full-precision base.

``nf4``
    bitsandbytes 4-bit NormalFloat weights computing in bf16 (CUDA only), as diffusers'
    ``train_dreambooth_lora_flux.py`` loads the transformer with ``--bnb_quantization_config_path``;
    its other weights (norms, the output projection) are then made fp32 by peft's
    ``prepare_model_for_kbit_training``. About 0.5 bytes a weight.
``int8``
    torchao int8 weight-only (one scale per output row); peft trains LoRA on torchao's int8
    layers. About 1 byte a weight; runs on CUDA and (slowly) on the CPU.

Both back-ends come with the optional ``gpu`` extra; :func:`check_quantize_base` refuses a missing
one before anything is loaded.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from trainer.config import QuantizeBase
from trainer.errors import MissingDependency

if TYPE_CHECKING:
    import torch

__all__ = [
    "QUANTIZE_BACKENDS",
    "check_quantize_base",
    "load_quantized_transformer",
    "prepare_quantized_for_training",
    "quantization_config",
    "quantize_in_memory",
]

# The package each quantized format needs (``pip install 'sdclient[gpu]'`` installs both).
QUANTIZE_BACKENDS: dict[str, str] = {"nf4": "bitsandbytes", "int8": "torchao"}


def check_quantize_base(kind: QuantizeBase, *, cuda: bool) -> None:
    """Check that ``--quantize-base kind`` can run here (cheap: nothing is imported).

    Raises:
        MissingDependency: nf4 without a CUDA GPU, or the back-end package is not installed.
    """
    if kind == "none":
        return
    if kind == "nf4" and not cuda:
        raise MissingDependency(
            "--quantize-base nf4 needs a CUDA GPU (bitsandbytes' 4-bit kernels) and this machine has "
            "none: leave the option off (--quantize-base none), or use --quantize-base int8 (torchao)."
        )
    package = QUANTIZE_BACKENDS[kind]
    if importlib.util.find_spec(package) is None:
        raise MissingDependency(
            f"--quantize-base {kind} needs the {package} package: `pip install 'sdclient[gpu]'` "
            f"(or `pip install {package}`), or leave the option off to train on the unquantized base."
        )


def quantization_config(kind: QuantizeBase, compute_dtype: torch.dtype) -> Any:
    """diffusers' quantization config for ``kind`` (``quantization_config=`` of ``from_pretrained``).

    Args:
        kind: ``nf4`` or ``int8``.
        compute_dtype: The dtype the dequantized weights compute in (the run's mixed precision).
    """
    if kind == "nf4":
        from diffusers import BitsAndBytesConfig

        bnb_config: Any = BitsAndBytesConfig  # untyped
        return bnb_config(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    if kind == "int8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        torchao_config: Any = TorchAoConfig  # untyped
        return torchao_config(Int8WeightOnlyConfig())
    raise ValueError(f"not a quantized format: {kind!r}")


def load_quantized_transformer(base_model: str, kind: QuantizeBase, dtype: torch.dtype) -> Any:
    """The base model's ``FluxTransformer2DModel`` with its linear layers quantized as ``kind``.

    ``dtype`` is the dtype of the layers left unquantized and of the computation. nf4 weights are
    quantized as they are loaded, onto the current CUDA device; int8 ones on the CPU.

    Raises:
        OSError, ValueError: the transformer cannot be found or read.
    """
    from diffusers import FluxTransformer2DModel

    loader: Any = FluxTransformer2DModel  # untyped
    return loader.from_pretrained(
        base_model,
        subfolder="transformer",
        quantization_config=quantization_config(kind, dtype),
        dtype=dtype,
    )


def prepare_quantized_for_training(transformer: Any, kind: QuantizeBase, device: torch.device) -> None:
    """Freeze a quantized transformer and place it on ``device`` for LoRA training.

    A quantized model keeps the dtypes it was loaded with (casting it is refused); nf4's
    unquantized weights are made fp32 by peft, as in QLoRA. Gradient checkpointing is enabled
    separately (diffusers' own, as for the unquantized base).
    """
    transformer.requires_grad_(False)
    if kind == "nf4":
        from peft import prepare_model_for_kbit_training

        prepare: Any = prepare_model_for_kbit_training  # untyped
        prepare(transformer, use_gradient_checkpointing=False)
    transformer.to(device)


def quantize_in_memory(transformer: Any, kind: QuantizeBase, compute_dtype: torch.dtype) -> None:
    """Quantize a transformer built in memory, in place, into the layers :func:`load_quantized_transformer`
    gives (for the GPU benchmark's random FLUX.1-dev, which is never saved).

    It does what diffusers' quantizers do as they load each weight: int8 runs torchao's
    ``quantize_`` on the linear layers; nf4 swaps every ``nn.Linear`` for bitsandbytes'
    ``Linear4bit`` (diffusers' ``replace_with_bnb_linear``) and quantizes its weight on the
    weight's device, which must be a CUDA one.
    """
    config = quantization_config(kind, compute_dtype)
    if kind == "int8":
        from torchao.quantization import quantize_

        quantize_(transformer, config.get_apply_tensor_subclass())
        return
    import bitsandbytes as bnb
    import torch
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    linears = {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    keep = list(getattr(transformer, "_keep_in_fp32_modules", None) or [])
    replace: Any = replace_with_bnb_linear  # untyped
    replace(transformer, modules_to_not_convert=keep, quantization_config=config)
    for name, module in transformer.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            old = linears[name]
            params = module.weight.__dict__  # quant_type, blocksize, ... as diffusers passes them
            weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, **params)
            module._parameters["weight"] = weight.to(old.weight.device)
            if old.bias is not None:
                module._parameters["bias"] = torch.nn.Parameter(old.bias.data, requires_grad=False)
    transformer.is_loaded_in_4bit = True  # as diffusers marks a model it loaded in 4 bits
