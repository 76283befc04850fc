"""Save a bitsandbytes 4-bit (NF4/FP4, double quantization) or 8-bit (LLM.int8) model folder.

The folder holds the packed weights and their quantization state next to a ``config.json`` with
``quantization_config``, so ``from_pretrained(folder)`` reloads it already quantized: no fp16
checkpoint is read and nothing is quantized again (a 7B model loads in ~4 GB, not ~14 GB).

GPTQ/AWQ are not offered: their calibration needs a CUDA GPU (see the README).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..config import ConfigError


def quantize_model(
    model: str,
    out: str | os.PathLike,
    *,
    bits: int = 4,
    quant_type: str = "nf4",
    compute_dtype: str = "auto",
    force: bool = False,
) -> Path:
    """Load ``model`` through ``BitsAndBytesConfig`` and ``save_pretrained`` it (with its tokenizer) to ``out``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ..model.load import ModelLoadError, _explain, default_dtype

    if bits not in (4, 8):
        raise ConfigError(f"--bits: expected 4 or 8, got {bits}")
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"--quant-type: expected nf4 or fp4, got {quant_type!r}")
    src, out = Path(model), Path(out)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{model}: not a model folder (no config.json)")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out}: exists and is not empty (pass --force to replace it)")
    dtype = default_dtype(compute_dtype)
    if bits == 4:
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    else:
        qconfig = BitsAndBytesConfig(load_in_8bit=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tqdm(total=3, desc=f"bitsandbytes {bits}-bit", unit="step") as bar:
        try:
            # bitsandbytes quantizes each linear layer as its weights are loaded
            q = AutoModelForCausalLM.from_pretrained(model, quantization_config=qconfig, device_map={"": device}, dtype=dtype)
        except OSError as e:
            raise ModelLoadError(_explain(model, e)) from None
        bar.update()
        q.save_pretrained(tmp)
        bar.update()
        for f in src.iterdir():  # tokenizer, chat template and our template metadata travel along
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "added_tokens"))
                                or f.suffix == ".jinja" or f.name == "chinese_vicuna.json"):
                shutil.copy(f, tmp / f.name)
        bar.update()
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
