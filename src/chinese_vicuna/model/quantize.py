"""bitsandbytes 4-bit (QLoRA: NF4 + double quantization) and 8-bit loading, and k-bit preparation."""

from __future__ import annotations

import torch


def bnb_config(kind: str, compute_dtype: torch.dtype):
    """The BitsAndBytesConfig for ``4bit`` (NF4, double quant, as in the QLoRA paper) or ``8bit``."""
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization: expected none, 4bit or 8bit, got {kind!r}")


def prepare_for_kbit_training(model, gradient_checkpointing: bool = False):
    """peft's preparation: freeze the base, upcast norms, make inputs require grad."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
