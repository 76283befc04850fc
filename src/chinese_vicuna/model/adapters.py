"""LoRA presets per architecture; attach, load, save and stack adapters (thin peft wrappers).

Adapters are saved in plain PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``,
loadable by ``PeftModel.from_pretrained``) plus ``chinese_vicuna.json`` with the template name,
so inference renders prompts exactly as training did.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The seed projects adapt q_proj/v_proj on LLaMA; other families name their projections differently.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "chatglm": ["query_key_value"],
    "baichuan": ["W_pack"],
    "gpt2": ["c_attn"],
}
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
META_FILE = "chinese_vicuna.json"


def target_modules(model, requested: list[str] | None) -> list[str] | str:
    """Requested names, ``all-linear``, or the architecture's default."""
    if requested:
        if requested in (["all-linear"], ["all_linear"]):
            return "all-linear"
        return list(requested)
    model_type = getattr(model.config, "model_type", "")
    if model_type not in DEFAULT_TARGETS:
        return "all-linear"
    return DEFAULT_TARGETS[model_type]


def attach_lora(
    model,
    *,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    targets: list[str] | None = None,
    modules_to_save: list[str] | None = None,
    init_adapter: str | None = None,
):
    """Wrap ``model`` with a trainable LoRA adapter (fresh, or initialised from ``init_adapter``)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if init_adapter:
        if not (Path(init_adapter) / "adapter_config.json").exists():
            raise FileNotFoundError(f"{init_adapter}: not an adapter folder (no adapter_config.json)")
        return PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules(model, targets),
        modules_to_save=modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
        # tied input/output embeddings (SmolLM2) stay one trained copy when both are in modules_to_save
        ensure_weight_tying=bool(modules_to_save) and bool(getattr(model.config, "tie_word_embeddings", False)),
    )
    return get_peft_model(model, config)


def trainable_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / max(total, 1):.3f}%)"


def write_meta(folder: str | os.PathLike, **meta) -> None:
    path = Path(folder) / META_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def read_meta(folder: str | os.PathLike) -> dict:
    """The template name, system prompt and base model recorded with an adapter (or {})."""
    path = Path(folder) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def load_adapters(model, adapters: list[tuple[str, str]]):
    """Load several named adapters onto one base (peft multi-adapter); the first is active."""
    from peft import PeftModel

    if not adapters:
        return model
    for _, folder in adapters:
        if not (Path(folder) / "adapter_config.json").exists():
            raise FileNotFoundError(f"{folder}: not an adapter folder (no adapter_config.json)")
    first_name, first_dir = adapters[0]
    peft_model = PeftModel.from_pretrained(model, first_dir, adapter_name=first_name)
    for name, folder in adapters[1:]:
        peft_model.load_adapter(folder, adapter_name=name)
    peft_model.set_adapter(first_name)
    peft_model.eval()
    return peft_model


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """``DIR`` or ``NAME=DIR`` -> [(name, dir)]; unnamed adapters are named after their folder."""
    out = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            name, folder = Path(spec).name or "adapter", spec
        out.append((name, folder))
    return out


def load_for_inference(base_model: str | None, adapter_specs: list[str], **load_kwargs):
    """Base model + tokenizer + adapters; the base defaults to the one recorded with the first adapter.

    Returns (model, tokenizer, meta) where meta is the first adapter's chinese_vicuna.json.
    """
    from .load import load_model_and_tokenizer

    adapters = parse_adapter_specs(adapter_specs)
    meta = read_meta(adapters[0][1]) if adapters else {}
    base = base_model or meta.get("base_model")
    if base and not Path(base).exists() and meta.get("base_model") == base and base_model is None:
        base = None  # recorded path is gone (other machine): fall back to the embedded default
    load_kwargs.setdefault("device_map", "auto")  # several GPUs share the layers; CPU without one
    model, tok = load_model_and_tokenizer(base, **load_kwargs)
    if adapters and (Path(adapters[0][1]) / "tokenizer_config.json").exists():
        from .load import load_tokenizer

        tok = load_tokenizer(adapters[0][1])
    model = load_adapters(model, adapters)
    model.eval()
    return model, tok, meta
