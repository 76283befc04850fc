"""LoRA presets per architecture; attach, load, save and stack adapters (thin peft wrappers).

Adapters are saved in plain PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``,
loadable by ``PeftModel.from_pretrained``) plus ``chinese_vicuna.json`` with the template name,
so inference renders prompts exactly as training did.

Adapters published by the seed projects (peft 0.2/0.3, 2023) load too: ``adapter_model.bin``
(read with ``weights_only=True``), config keys today's ``LoraConfig`` no longer knows
(``enable_lora``, ``merge_weights``) and a ``base_model_name_or_path`` that exists nowhere. All
loading goes through :func:`load_adapter`, which reads the files itself and checks that every
LoRA weight found its place, instead of letting a renamed key leave a module silently untrained.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
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
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# A key component peft puts the adapter name after (``q_proj.lora_A.default.weight``).
_NAMED = r"lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|modules_to_save"
_LORA_KEY = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)")


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
    use_dora: bool = False,
    use_rslora: bool = False,
    lora_init: str = "default",
    pissa_niter: int = 0,
):
    """Wrap ``model`` with a trainable LoRA adapter (fresh, or initialised from ``init_adapter``).

    ``use_dora``, ``use_rslora``, ``lora_init`` and ``pissa_niter`` pick peft's LoRA variants
    (see :mod:`chinese_vicuna.model.variants`); PiSSA and OLoRA rewrite the base weights in place.
    """
    from peft import LoraConfig, get_peft_model

    from ..config import ConfigError
    from .variants import variant_kwargs

    variant = variant_kwargs(use_dora=use_dora, use_rslora=use_rslora, lora_init=lora_init, pissa_niter=pissa_niter)
    if init_adapter:
        if lora_init != "default" or use_dora or use_rslora:
            raise ConfigError("init_adapter: continues an adapter with its own settings; drop use_dora, use_rslora "
                              "and lora_init (they only apply to a new adapter)")
        from .variants import is_mutating

        folder = resolve_adapter(init_adapter)
        if is_mutating(read_adapter_config(folder).get("init_lora_weights")):
            raise ConfigError(f"init_adapter: {folder} is a PiSSA/OLoRA checkpoint in training form; continue it with "
                              "resume, or start from its run's final adapter (saved as plain LoRA)")
        return load_adapter(model, folder, trainable=True)
    config = LoraConfig(
        **variant,
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


def resolve_adapter(folder: str) -> str:
    """A local adapter folder as given, or a hub id resolved to its snapshot in the Hugging Face cache."""
    from .load import ADAPTER_FILES, looks_like_hub_id, resolve_hub_id

    if (Path(folder) / ADAPTER_CONFIG).exists():
        return folder
    if looks_like_hub_id(folder):
        snapshot = resolve_hub_id(folder, ADAPTER_FILES)
        if (Path(snapshot) / ADAPTER_CONFIG).exists():
            return snapshot
        raise FileNotFoundError(f"{folder}: the hub repository has no {ADAPTER_CONFIG}: not a LoRA adapter")
    raise FileNotFoundError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG})")


def read_adapter_config(folder: str | os.PathLike) -> dict:
    """``adapter_config.json`` as written, with a clear error when it is missing or not JSON."""
    from .load import ModelLoadError

    path = Path(folder) / ADAPTER_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None


def lora_config(folder: str | os.PathLike, *, trainable: bool = False):
    """A ``LoraConfig`` from an adapter folder, old (peft 0.2/0.3) or new.

    Keys this peft does not know (``enable_lora``, ``merge_weights`` of 2023's peft) are dropped
    with a note: they described options that today's LoRA layers implement by default or not at all.
    """
    from peft import LoraConfig

    from .load import ModelLoadError

    raw = read_adapter_config(folder)
    kind = str(raw.get("peft_type") or "LORA").upper()
    if kind != "LORA":
        raise ModelLoadError(f"{folder}: a {kind} adapter; only LoRA adapters are supported")
    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init} - {"peft_type"}
    dropped = sorted(k for k in raw if k not in fields and k != "peft_type")
    if dropped:
        print(f"note: {folder}: ignoring {ADAPTER_CONFIG} keys unknown to this peft version (written by an "
              f"older one): {', '.join(dropped)}", file=sys.stderr)
    kwargs = {k: v for k, v in raw.items() if k in fields}
    kwargs["inference_mode"] = not trainable
    if str(kwargs.get("init_lora_weights")).startswith("pissa_niter"):
        # peft would rebuild the residual base with a fresh randomized SVD, not the one trained on
        raise ModelLoadError(f"{folder}: a PiSSA checkpoint initialised by randomized SVD (pissa_niter): its residual "
                             "base cannot be rebuilt; use the run's final adapter (saved as plain LoRA) or resume the run")
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{folder}/{ADAPTER_CONFIG}: not a valid LoRA config: {e}") from None


def adapter_weights_path(folder: str | os.PathLike, names: tuple[str, ...] = ADAPTER_WEIGHTS) -> Path:
    for name in names:
        if (Path(folder) / name).exists():
            return Path(folder) / name
    raise FileNotFoundError(f"{folder}: no adapter weights (expected one of {', '.join(names)})")


def read_weights(path: str | os.PathLike) -> dict:
    """Tensors of a ``.safetensors`` file or a torch pickle (``weights_only``: no code runs on load)."""
    import torch

    from .load import ModelLoadError

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends: anything but plain tensors
        raise ModelLoadError(f"{path}: not a plain tensor file ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a dict of tensor names to tensors")
    return state


def normalize_adapter_keys(state: dict, adapter_name: str = "default") -> dict:
    """Keys as peft saves them today: ``base_model.model.<module>.lora_A.weight``, no adapter name.

    Handles a full ``PeftModel.state_dict()`` (adapter name inside, ``modules_to_save``/
    ``original_module`` wrappers, frozen base weights that are dropped) and keys saved from the
    inner model without the ``base_model.model.`` prefix.
    """
    out = {}
    for key, value in state.items():
        k = re.sub(rf"\.({_NAMED})\.{re.escape(adapter_name)}(?=\.|$)", r".\1", key)
        if ".original_module." in k or ".base_layer." in k:
            continue  # frozen base weights of a whole-model state dict
        k = k.replace(".modules_to_save.", ".")
        out[k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k] = value
    return out


def read_adapter_state(folder: str | os.PathLike, names: tuple[str, ...] = ADAPTER_WEIGHTS) -> dict:
    """An adapter's tensors under today's key names, from safetensors or a legacy ``.bin``."""
    return normalize_adapter_keys(read_weights(adapter_weights_path(folder, names)))


def _input_embedding_key(model) -> str | None:
    emb = model.get_input_embeddings()
    return next((f"{PEFT_PREFIX}{n}.weight" for n, m in model.named_modules() if m is emb), None)


def load_state(
    peft_model, state: dict, folder: str | os.PathLike, name: str = "default", hint: str | None = None
) -> None:
    """Copy adapter tensors into ``peft_model``'s adapter ``name``; every LoRA weight must find its place.

    ``hint`` is the advice given on a shape mismatch (default: load the base the adapter was trained on).

    Raises:
        ModelLoadError: a tensor's shape differs from the model's (another base, rank or vocabulary),
            or LoRA weights of the adapter or of the model are left unmatched.
    """
    from peft import set_peft_model_state_dict

    from .load import ModelLoadError

    cfg = peft_model.peft_config[name]
    keep = list(cfg.modules_to_save or [])
    # Besides LoRA and modules_to_save tensors, peft also saves resized embeddings under the base's own
    # names (save_embedding_layers) and loads them into the base: so does this; anything else is dropped.
    base_names = set(peft_model.state_dict())
    ignored = [
        k for k in state
        if not _LORA_KEY.search(k) and not any(f".{m}." in f".{k}" for m in keep) and k not in base_names
    ]  # fmt: skip
    state = {k: v for k, v in state.items() if k not in ignored}
    if ignored:
        print(f"note: {folder}: ignoring {len(ignored)} tensors that are not LoRA weights "
              f"(e.g. {ignored[0]})", file=sys.stderr)
    try:
        result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
    except RuntimeError as e:  # load_state_dict's size mismatch
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:300])
        if hint is None:
            trained_on = read_adapter_config(folder).get("base_model_name_or_path") or "another base"
            hint = f"it was trained on {trained_on}: pass that base model (--model / base_model)"
        raise ModelLoadError(f"{folder}: the adapter does not fit this model ({detail}); {hint}") from None
    unexpected = [k for k in result.unexpected_keys if _LORA_KEY.search(k)]
    missing = [k for k in result.missing_keys if _LORA_KEY.search(k) and f".{name}" in k]
    if unexpected or missing:
        what = f"weights the model has no place for: {unexpected[:3]}" if unexpected else f"missing weights: {missing[:3]}"
        raise ModelLoadError(f"{folder}: the adapter does not match the model's LoRA layers ({what})")


def load_adapter(model, folder: str, *, name: str = "default", trainable: bool = False):
    """Wrap ``model`` (or add to a ``PeftModel``) with the adapter in ``folder``, old format or new.

    A base whose vocabulary the adapter extended (its saved ``embed_tokens`` has more rows) is
    resized first; only a bare model can be, so the first adapter decides the vocabulary.
    """
    from peft import PeftModel, get_peft_model

    cfg = lora_config(folder, trainable=trainable)
    state = read_adapter_state(folder)
    if isinstance(model, PeftModel):
        model.add_adapter(name, cfg)
    else:
        rows = state.get(_input_embedding_key(model) or "", None)
        if rows is not None and rows.shape[0] != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows.shape[0], mean_resizing=False)  # the saved copy replaces it
        # the base actually used (peft warns when the recorded one differs, as it always does for seed adapters)
        cfg.base_model_name_or_path = getattr(model, "name_or_path", None) or cfg.base_model_name_or_path
        model = get_peft_model(model, cfg, adapter_name=name)
    load_state(model, state, folder, name)
    if not trainable:
        model.eval()
    return model


def load_adapters(model, adapters: list[tuple[str, str]]):
    """Load several named adapters onto one base (peft multi-adapter); the first is active."""
    if not adapters:
        return model
    adapters = [(name, resolve_adapter(folder)) for name, folder in adapters]
    for name, folder in adapters:
        model = load_adapter(model, folder, name=name)
    model.set_adapter(adapters[0][0])
    model.eval()
    return model


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """``DIR`` or ``NAME=DIR`` -> [(name, dir)]; unnamed adapters are named after their folder."""
    out = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            # peft keeps adapters in ModuleDicts, whose keys cannot hold a "." (lora-v1.5)
            name, folder = Path(spec).name.replace(".", "_") or "adapter", spec
        out.append((name, folder))
    return out


def default_base(adapter: str, meta: dict) -> str | None:
    """The base an adapter was trained on, when no ``--model`` is given; ``None`` = the embedded default.

    Our adapters record it in ``chinese_vicuna.json`` (a path that may be gone on another machine:
    then the embedded default). A seed adapter only has peft's ``base_model_name_or_path``, often a hub
    id that no longer exists (``decapoda-research/llama-7b-hf``): used when it is a local folder or
    cached, else a clear error, since the embedded default cannot fit a 7B adapter.
    """
    from .load import EMBEDDED_NAME, ModelLoadError, looks_like_hub_id, resolve_base_model

    if meta:
        recorded = meta.get("base_model")
        return recorded if recorded and Path(recorded).exists() else None
    recorded = read_adapter_config(adapter).get("base_model_name_or_path")
    if not recorded or Path(recorded).exists():
        return recorded or None
    if recorded.endswith(EMBEDDED_NAME):
        return None  # the hub id of the embedded default
    if looks_like_hub_id(recorded):
        try:
            return resolve_base_model(recorded)
        except ModelLoadError as e:
            raise ModelLoadError(f"{adapter}: trained on {recorded}, which is not available here ({e}) "
                                 "Pass the base model with --model.") from None
    raise ModelLoadError(f"{adapter}: trained on {recorded}, which is not available here: pass the base with --model")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """An adapter folder that saved the tokenizer it was trained with (it is used instead of the base's)."""
    return (Path(folder) / "tokenizer_config.json").exists()


def load_for_inference(base_model: str | None, adapter_specs: list[str], **load_kwargs):
    """Base model + tokenizer + adapters; the base defaults to the one recorded with the first adapter.

    Adapters may be folders or hub ids (resolved through the Hugging Face cache).
    Returns (model, tokenizer, meta) where meta is the first adapter's chinese_vicuna.json.
    """
    from .load import load_model_and_tokenizer

    adapters = [(name, resolve_adapter(folder)) for name, folder in parse_adapter_specs(adapter_specs)]
    meta = read_meta(adapters[0][1]) if adapters else {}
    base = base_model or (default_base(adapters[0][1], meta) if adapters else None)
    load_kwargs.setdefault("device_map", "auto")  # several GPUs share the layers; CPU without one
    model, tok = load_model_and_tokenizer(base, **load_kwargs)
    if adapters and has_tokenizer(adapters[0][1]):
        from .load import load_tokenizer

        tok = load_tokenizer(adapters[0][1])
    model = load_adapters(model, adapters)
    model.eval()
    return model, tok, meta
