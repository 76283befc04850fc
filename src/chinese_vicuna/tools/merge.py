"""Merge LoRA adapters into their base model and save a plain safetensors HF model.

Adapters are merged in the order given, the way Chinese-LLaMA-Alpaca merges LLaMA-Plus and then
Alpaca-Plus: adapter 2 was trained on top of base + adapter 1, so it is applied to that sum.
Every target module of every adapter is merged (the seed merged q/v only), and
``modules_to_save`` copies replace the base weights.

Two ways to do it:

* in memory (default): each adapter loaded into peft's LoRA layers (``model.adapters.load_adapter``,
  which also reads the seeds' ``.bin`` adapters) + peft's ``merge_and_unload``;
* ``low_memory``: the base's safetensors shards are streamed one tensor at a time and
  ``W += scale * B @ A`` is applied by hand (DoRA: then each output row rescaled to its trained
  magnitude, ``W = m / ||W|| * W``, as peft merges it), so peak memory is one tensor plus one output shard.

Adapters trained with PiSSA/OLoRA are saved by the trainer as plain LoRA for the original base and
merge like any other. A checkpoint of such a run is in training form (its base is the residual
``W - s B0 A0``): the in-memory merge rebuilds that residual through peft (exact SVD or QR, the same
as in training); the streaming merge refuses it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError

PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def parse_size(text: str | int) -> int:
    """``2GB``, ``500MB``, ``200KB``, ``1GiB`` or a byte count -> bytes (HF's 1000-based units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--max-shard-size: expected a size like 2GB or 500MB, got {text!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF model folder, in index order."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [folder / n for n in dict.fromkeys(names)]
    single = folder / "model.safetensors"
    return [single] if single.exists() else []


class ShardWriter:
    """Write tensors into HF-style safetensors shards as they come, never holding more than one shard."""

    def __init__(self, folder: Path, max_shard_size: int):
        self.folder, self.limit = folder, max_shard_size
        self.buf: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.parts: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buf and self.size + nbytes > self.limit:
            self._flush()
        self.buf[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"part-{len(self.parts):05d}.safetensors"
        save_file(self.buf, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.buf)))
        self.buf, self.size = {}, 0

    def close(self) -> list[Path]:
        """Name the shards ``model-0000i-of-0000n.safetensors`` (or ``model.safetensors``) + the index."""
        if self.buf:
            self._flush()
        n = len(self.parts)
        if n == 1:
            final = self.folder / "model.safetensors"
            os.replace(self.parts[0][0], final)
            return [final]
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self.parts, 1):
            final = self.folder / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        return files


@dataclass
class LoraDelta:
    """One module's low-rank update: ``delta = scale * B @ A`` (transposed for fan_in_fan_out/embeddings)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transpose: bool = False
    magnitude: torch.Tensor | None = None
    """DoRA: the trained norm of each output row of the merged weight."""

    def delta(self) -> torch.Tensor:
        d = (self.b.float() @ self.a.float()) * self.scale
        return d.T if self.transpose else d


@dataclass
class AdapterWeights:
    folder: str
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    """HF weight name (``model.layers.0.self_attn.q_proj.weight``) -> its LoRA update."""
    replace: dict[str, torch.Tensor] = field(default_factory=dict)
    """HF weight name -> full replacement (``modules_to_save``, saved embedding layers)."""


def adapter_config(folder: str) -> dict:
    from ..model.adapters import read_adapter_config

    return read_adapter_config(folder)


def _pattern_value(patterns: dict, module: str, default):
    # peft matches rank/alpha pattern keys against the end of the module name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(folder: str) -> AdapterWeights:
    """Load an adapter's tensors and turn them into per-weight deltas (for the streaming merge).

    Seed adapters (``adapter_model.bin``, peft 0.2/0.3 key names) are read as well.
    """
    from ..model.adapters import read_adapter_state

    cfg = adapter_config(folder)
    from ..model.variants import rebuilds_base

    unsupported = [k for k in ("lora_bias",) if cfg.get(k)]
    if cfg.get("peft_type", "LORA") != "LORA" or unsupported:
        raise ConfigError(
            f"{folder}: {cfg.get('peft_type')} {' '.join(unsupported)} adapters are not supported by --low-memory; "
            "merge without --low-memory (peft's merge_and_unload handles them)"
        )
    if rebuilds_base(cfg.get("init_lora_weights")):
        raise ConfigError(
            f"{folder}: a {cfg['init_lora_weights']} adapter in training form (it fits the base its initialisation "
            "left, not the original one); merge it without --low-memory (peft rebuilds that base), or, for "
            "PiSSA/OLoRA, merge the run's final adapter, which is saved as plain LoRA"
        )
    state = read_adapter_state(folder)
    out = AdapterWeights(folder)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?:\.weight)?", name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
        else:  # modules_to_save copy, stored under the original weight name
            out.replace[name.replace(".modules_to_save", "")] = tensor
    for module, p in pairs.items():
        embedding = "lora_embedding_A" in p
        a, b = (p["lora_embedding_A"], p["lora_embedding_B"]) if embedding else (p["lora_A"], p["lora_B"])
        r = a.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        magnitude = p.get("lora_magnitude_vector")
        if magnitude is not None and embedding:
            raise ConfigError(f"{folder}: DoRA on an embedding layer ({module}) is not supported by --low-memory; "
                              "merge without --low-memory")
        out.deltas[module + ".weight"] = LoraDelta(a, b, scale, transpose=embedding or cfg.get("fan_in_fan_out", False),
                                                   magnitude=magnitude)
    return out


def _iter_base(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name)


def merge_streaming(
    base: Path, adapters: list[str], tmp: Path, max_shard_size: int, dtype: torch.dtype | None
) -> tuple[int, bool]:
    """The low-memory merge, written by hand with safetensors: peft only merges a model loaded whole.

    Returns the rows of the final input embedding (an adapter may have grown the vocabulary) and
    whether a tied ``lm_head`` was untied by an adapter that saved its own.
    """
    from tqdm.auto import tqdm

    files = weight_files(base)
    if not files:
        raise ConfigError(f"{base}: --low-memory needs a local folder with safetensors weights; merge without it")
    weights = [read_adapter(a) for a in adapters]
    used: set[tuple[int, str]] = set()
    writer = ShardWriter(tmp, max_shard_size)
    vocab_rows = 0
    for name, w in tqdm(_iter_base(files), total=len(names_seen(files)), desc="merging (low memory)", unit="tensor"):
        w = _apply(name, w, weights, used, dtype or w.dtype)
        if name.endswith("embed_tokens.weight"):
            vocab_rows = w.shape[0]
        writer.add(name, w)
    untied = False
    if ("lm_head.weight" not in names_seen(files)) and any("lm_head.weight" in aw.replace for aw in weights):
        # A tied base has no lm_head tensor; an adapter that saved lm_head unties it.
        writer.add("lm_head.weight", _apply("lm_head.weight", None, weights, used, dtype))
        untied = True
    writer.close()
    for i, aw in enumerate(weights):
        missing = [n for n in [*aw.deltas, *aw.replace] if (i, n) not in used]
        if missing:
            raise ConfigError(f"{aw.folder}: weights not found in the base model {base}: {missing[:3]}")
    return vocab_rows, untied


def _apply(name: str, w, weights: list[AdapterWeights], used: set, dtype) -> torch.Tensor:
    """Apply every adapter to one weight, in order: a full copy replaces it, a LoRA update adds to it."""
    for i, aw in enumerate(weights):
        if name in aw.replace:
            w = aw.replace[name]
            used.add((i, name))
        if name in aw.deltas:
            if w is None:
                raise ConfigError(f"{aw.folder}: {name} is not in the base model")
            lora = aw.deltas[name]
            d = lora.delta()
            if d.shape != w.shape:
                raise ConfigError(f"{aw.folder}: {name} update is {tuple(d.shape)}, base weight {tuple(w.shape)}")
            w = w.float() + d
            if lora.magnitude is not None:  # DoRA (peft's DoraLinearLayer): rows rescaled to the trained norms
                rows = 0 if lora.transpose else 1  # the norm runs over the input features
                factor = lora.magnitude.float() / torch.linalg.norm(w, dim=rows)
                w = w * (factor.view(1, -1) if lora.transpose else factor.view(-1, 1))
            used.add((i, name))
    return w.to(dtype or w.dtype)


def names_seen(files: list[Path]) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names.update(sf.keys())
    return names


def merge_in_memory(base: str, adapters: list[str], tmp: Path, max_shard_size: int, dtype):
    """peft's merge: load the base, then for each adapter load it (old format or new) + ``merge_and_unload``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from ..model.adapters import load_adapter
    from ..model.load import ModelLoadError, explain_load_error

    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto")
    except OSError as e:
        raise ModelLoadError(explain_load_error(base, e)) from None
    for folder in tqdm(adapters, desc="merging adapters", unit="adapter"):
        # load_adapter resizes the embeddings first when the adapter saved an extended vocabulary
        model = load_adapter(model, folder).merge_and_unload()
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    return model


def _tokenizer_source(base: str, adapters: list[str]) -> str:
    for folder in [*reversed(adapters), base]:
        if any((Path(folder) / f).exists() for f in TOKENIZER_FILES):
            return folder
    if Path(base).is_dir():
        raise ConfigError(f"no tokenizer in the adapters nor in the base {base}: save one with the model or an adapter")
    return base  # a hub id


def merge_adapters(
    base: str | None,
    adapters: list[str],
    out: str | os.PathLike,
    *,
    low_memory: bool = False,
    max_shard_size: str | int = "2GB",
    dtype: str = "auto",
    force: bool = False,
) -> Path:
    """Merge ``adapters`` (in order) into ``base`` and write a safetensors HF model folder to ``out``.

    The folder gets the tokenizer (from the last adapter that has one, else the base), its chat
    template, a generation config whose BOS/EOS/pad agree with the tokenizer, and
    ``chinese_vicuna.json`` (template name) from the last adapter. Written to ``out.tmp`` and
    renamed, so an interrupted merge leaves no half folder.
    """
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    from ..data.templates import add_eos_ids, get_template
    from ..data.tokenize import save_tokenizer
    from ..model.adapters import default_base, read_meta, resolve_adapter, write_meta
    from ..model.load import fix_special_tokens, load_tokenizer, resolve_base_model

    if not adapters:
        raise ConfigError("merge: give at least one --adapter")
    adapters = [resolve_adapter(a) for a in adapters]  # folders, or hub ids from the Hugging Face cache
    base = resolve_base_model(base or default_base(adapters[0], read_meta(adapters[0])))
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out}: exists and is not empty (pass --force to replace it)")
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    limit = parse_size(max_shard_size)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = load_tokenizer(_tokenizer_source(base, adapters))
    if not getattr(tok, "chat_template", None):
        base_tok = load_tokenizer(base)
        tok.chat_template = getattr(base_tok, "chat_template", None)
    meta = next((m for m in map(read_meta, reversed(adapters)) if m), {})
    template = get_template(meta["template"], tok, meta.get("system_prompt")) if meta.get("template") else None
    if low_memory:
        rows, untied = merge_streaming(Path(base), adapters, tmp, limit, torch_dtype)
        config = AutoConfig.from_pretrained(base)
        if rows and rows != config.vocab_size:
            config.vocab_size = rows
        if untied:
            config.tie_word_embeddings = False
        try:
            gen = GenerationConfig.from_pretrained(base)
        except OSError:
            gen = GenerationConfig.from_model_config(config)
        holder = SimpleNamespace(config=config, generation_config=gen)
    else:
        holder = merge_in_memory(base, adapters, tmp, limit, torch_dtype)
    fix_special_tokens(holder, tok)
    if template is not None:
        add_eos_ids(holder.generation_config, template.end_token_ids())
    holder.config.save_pretrained(tmp)
    holder.generation_config.save_pretrained(tmp)
    if template is not None:  # transformers, llama.cpp and vLLM then render the prompt it was trained on
        save_tokenizer(tok, template, tmp)
    else:
        tok.save_pretrained(tmp)
    meta.pop("base_model", None)
    write_meta(tmp, **meta, merged_from={"base": str(base), "adapters": [str(a) for a in adapters]})
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out
