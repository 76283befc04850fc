"""Save a bitsandbytes 4-bit (NF4/FP4, double quantization) or 8-bit (LLM.int8) model folder.

The folder holds the packed weights and their quantization state next to a ``config.json`` with
``quantization_config``, so ``from_pretrained(folder)`` reloads it already quantized: no fp16
checkpoint is read and nothing is quantized again (a 7B model loads in ~4 GB, not ~14 GB).

``quantize_gptq`` writes a GPTQ folder (Chinese-Vicuna's deployment path: a 7B model in under 4 GB)
through GPTQModel, which transformers, vLLM and our chat/generate/serve load. GPTQModel 7.x needs
torch >= 2.14.1 (a dedicated environment; benchmarks/gpu_check.sh installs it on a GPU machine).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..config import ConfigError


def check_folders(model: str, out: str | os.PathLike, force: bool) -> tuple[Path, Path]:
    """``(model folder, output folder)``, checked: the model has a ``config.json``, the output is empty
    unless ``force``.

    Raises:
        FileNotFoundError: ``model`` is not a model folder.
        ConfigError: ``out`` exists and holds files, without ``force``.
    """
    src, out = Path(model), Path(out)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{model}: not a model folder (no config.json)")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out}: exists and is not empty (pass --force to replace it)")
    return src, out


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

    from ..model.load import ModelLoadError, default_dtype, explain_load_error

    if bits not in (4, 8):
        raise ConfigError(f"--bits: expected 4 or 8, got {bits}")
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"--quant-type: expected nf4 or fp4, got {quant_type!r}")
    src, out = check_folders(model, out, force)
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
            raise ModelLoadError(explain_load_error(model, e)) from None
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


def read_calibration(path: str | os.PathLike, limit: int = 256) -> list[str]:
    """Calibration texts from a .txt file (one per non-empty line) or JSON/JSONL records (``text``, or
    ``instruction`` + ``input`` + ``output``, or a conversation's turns joined).

    Raises:
        ConfigError: missing, empty, or a record without text.
    """
    import json

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--calibration: {p}: file not found")
    texts: list[str] = []
    if p.suffix == ".txt":
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raw = p.read_text(encoding="utf-8")
        try:
            rows = json.loads(raw) if p.suffix == ".json" else [json.loads(x) for x in raw.splitlines() if x.strip()]
        except json.JSONDecodeError as e:
            raise ConfigError(f"--calibration: {p}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, r in enumerate(rows if isinstance(rows, list) else [rows], 1):
            if not isinstance(r, dict):
                raise ConfigError(f"--calibration: {p}:{i}: expected a JSON object")
            if "text" in r:
                text = str(r["text"])
            elif "instruction" in r:
                text = "\n".join(str(r.get(k) or "") for k in ("instruction", "input", "output")).strip()
            elif isinstance(r.get("conversations") or r.get("messages"), list):
                turns = r.get("conversations") or r.get("messages")
                text = "\n".join(str(t.get("value") or t.get("content") or "") for t in turns if isinstance(t, dict))
            else:
                raise ConfigError(f"--calibration: {p}:{i}: expected text, instruction/output or conversations")
            if text.strip():
                texts.append(text)
    if not texts:
        raise ConfigError(f"--calibration: {p}: no text in it")
    return texts[:limit]


def quantize_gptq(
    model: str,
    out: str | os.PathLike,
    calibration: str | os.PathLike,
    *,
    bits: int = 4,
    group_size: int = 128,
    force: bool = False,
) -> Path:
    """GPTQ-quantize ``model`` with GPTQModel on ``calibration`` texts and save the folder to ``out``.

    Raises:
        ConfigError: bad bits/group size, an existing output, or GPTQModel missing (with how to install it).
    """
    if bits not in (2, 3, 4, 8):
        raise ConfigError(f"--bits: GPTQ takes 2, 3, 4 or 8, got {bits}")
    src, out = check_folders(model, out, force)
    texts = read_calibration(calibration)
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except ImportError as e:
        raise ConfigError(
            f"--method gptq needs GPTQModel ({e}): pip install gptqmodel in an environment with torch >= 2.14.1 "
            "(it requires that torch); see benchmarks/gpu_check.sh"
        ) from None
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    q = GPTQModel.load(str(src), QuantizeConfig(bits=bits, group_size=group_size))
    q.quantize(texts, batch_size=1)  # GPTQModel shows its own per-layer progress bar
    q.save(str(tmp))
    for f in src.iterdir():  # our template metadata travels along (GPTQModel saves the tokenizer)
        if f.is_file() and (f.suffix == ".jinja" or f.name == "chinese_vicuna.json") and not (tmp / f.name).exists():
            shutil.copy(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
