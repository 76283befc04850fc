"""HF model (or base + adapters) -> GGUF files: export, metadata, LoRA adapter GGUFs.

Export uses the field's own tools: the ``gguf`` package's ``GGUFWriter``, tensor-name map, vocab
readers and ``SpecialVocab`` (tokenizer, merges, special ids, chat template), and llama.cpp's
quantizer (``llama_cpp.llama_model_quantize``) for q4_0 and the K-quants.

llama.cpp's own ``convert_hf_to_gguf.py`` is not installable: neither the ``gguf`` wheel nor the
``llama-cpp-python`` wheel ships it, and the copy in llama-cpp-python's sdist needs the
``gguf-py`` of the same checkout (PyPI's gguf 0.19.0 lacks ``LazyChunkedTensor``). So the LLaMA
conversion is written here by hand — hyperparameters, the q/k rotary un-permutation, the BPE
pre-tokenizer id — following that script step by step; ``--converter PATH`` runs the real script
of a llama.cpp checkout instead, for other architectures.

Running a GGUF file (decoding, LoRA adapters, perplexity) is ``generation/llamacpp.py``.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from hashlib import sha256
from pathlib import Path

from ..config import ConfigError

WRITTEN = ("f32", "f16", "bf16", "q8_0")
QUANTIZED = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}
LLAMA_TYPES = ("llama", "mistral")
GGUF_META_PREFIX, GGUF_META_KEYS = "chinese_vicuna", ("template", "system_prompt")
# convert_hf_to_gguf.py identifies a byte-level BPE pre-tokenizer by hashing how it splits this text.
CHK_TXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# The LLaMA-family entries of that script's table (its hashes are generated, not edited by hand).
BPE_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
}


def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _add_hparams(w, cfg: dict, gguf_type: str) -> None:
    import gguf

    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(head_dim)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif kind not in ("default", None):
        raise ConfigError(f"rope type {kind!r} is not handled by the built-in converter; pass --converter")
    w.add_file_type(getattr(gguf.LlamaFileType, {"f32": "ALL_F32"}.get(gguf_type, f"MOSTLY_{gguf_type.upper()}")))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _bpe_tokens(folder: Path, tok, n_vocab: int):
    """Byte-level BPE vocabulary as convert_hf_to_gguf.py's ``get_vocab_base`` builds it."""
    import gguf

    chkhsh = sha256(str(tok.encode(CHK_TXT)).encode()).hexdigest()
    if chkhsh not in BPE_PRE and (folder / "tokenizer.json").exists():
        # A vocabulary extended with added tokens (`vocab extend --method added`) splits them off
        # before pre-tokenizing, in HF and llama.cpp alike: identify the base without them.
        from tokenizers import Tokenizer

        tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        tj["added_tokens"] = [t for t in tj.get("added_tokens", []) if t.get("special")]
        chkhsh = sha256(str(Tokenizer.from_str(json.dumps(tj)).encode(CHK_TXT).ids).encode()).hexdigest()
    if chkhsh not in BPE_PRE:
        raise ConfigError(
            f"{folder}: unknown BPE pre-tokenizer (hash {chkhsh[:12]}); convert with llama.cpp's script: --converter"
        )
    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            looks_special = reverse[i].startswith("<|") and reverse[i].endswith("|>")
            types.append(gguf.TokenType.CONTROL if added[i].special or looks_special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, None, types, "gpt2", BPE_PRE[chkhsh]


def _with_merge_scores(rows: list[tuple[bytes, float, object]], tj: dict) -> list[tuple[bytes, float, object]]:
    """SentencePiece scores for a tokenizer.json-only LLaMA vocabulary (what save_pretrained writes).

    gguf's LlamaHfVocab gives every piece the same score, but llama.cpp's SentencePiece tokenizer
    merges the adjacent pair whose piece scores highest, so equal scores tokenize text differently
    from transformers. A piece made by merge number r scores -r: the BPE order transformers applies.
    """
    merges = tj.get("model", {}).get("merges") or []
    vocab = tj.get("model", {}).get("vocab") or {}
    rank = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    by_id = {i: piece for piece, i in vocab.items()}
    return [(text, -float(rank[by_id[i]]) if by_id.get(i) in rank else score, kind)
            for i, (text, score, kind) in enumerate(rows)]


def _add_vocab(w, folder: Path, cfg: dict) -> None:
    """Tokens, scores, types, merges, special ids, add-BOS and chat template."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    n_vocab = cfg["vocab_size"]
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")) if (folder / "tokenizer.json").exists() else {}
    if (folder / "tokenizer.model").exists() or tj.get("model", {}).get("byte_fallback"):
        # SentencePiece LLaMA tokenizers: the .model file, or its tokenizer.json conversion
        if (folder / "tokenizer.model").exists():
            rows = list(gguf.SentencePieceVocab(folder).all_tokens())
        else:
            rows = _with_merge_scores(list(gguf.LlamaHfVocab(folder).all_tokens()), tj)
        if len(rows) > n_vocab:
            raise ConfigError(f"{folder}: {len(rows)} tokens but {n_vocab} embedding rows; resize the model first")
        added = tok.added_tokens_decoder  # e.g. Chinese-Alpaca's [PAD]: in tokenizer.json, not the .model
        for i in range(len(rows), n_vocab):
            if i in added:
                kind = gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
                rows.append((added[i].content.encode(), -1000.0, kind))
            else:
                rows.append((f"[PAD{i}]".encode(), -1000.0, gguf.TokenType.UNUSED))
        tokens, scores, types = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        model, pre = "llama", "default"
    else:
        tokens, scores, types, model, pre = _bpe_tokens(folder, tok, n_vocab)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens))
    # llama.cpp adds BOS exactly when the HF tokenizer does, so both tokenize prompts alike.
    probe = tok("a").input_ids
    special.add_special_token["bos"] = bool(probe) and probe[0] == tok.bos_token_id
    # The template transformers renders from this folder (a merged model's is the trained one).
    special.chat_template = getattr(tok, "chat_template", None) or special.chat_template
    special.add_to_gguf(w, quiet=True)


def read_gguf_meta(path: str | os.PathLike) -> dict:
    """The template name and system prompt ``export-gguf`` recorded in a GGUF file (or {})."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key in GGUF_META_KEYS:
        field = reader.get_field(f"{GGUF_META_PREFIX}.{key}")
        if field is not None:
            meta[key] = field.contents()
    return meta


def _permute(t, n_head: int):
    """Undo HF's q/k rotary permutation: llama.cpp rotates interleaved pairs, as Meta's code does."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def write_gguf(folder: str | os.PathLike, out: str | os.PathLike, gguf_type: str = "f16") -> Path:
    """Write a LLaMA-family HF folder as GGUF (f32, f16, bf16 or q8_0), one tensor in memory at a time."""
    import gguf
    import numpy as np
    from safetensors import safe_open
    from tqdm.auto import tqdm

    from ..model.adapters import read_meta
    from .merge import weight_files

    folder, out = Path(folder), Path(out)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") not in LLAMA_TYPES:
        raise ConfigError(
            f"{folder}: model_type {cfg.get('model_type')!r}: the built-in converter handles {', '.join(LLAMA_TYPES)}; "
            "pass --converter path/to/llama.cpp/convert_hf_to_gguf.py for other architectures"
        )
    files = weight_files(folder)
    if not files:
        raise ConfigError(f"{folder}: no safetensors weights (save the model with save_pretrained first)")
    n_layer, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    qtype = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[gguf_type]
    qtype = getattr(gguf.GGMLQuantizationType, qtype)

    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(cfg.get("_name_or_path") or folder.name)
    _add_hparams(w, cfg, gguf_type)
    _add_vocab(w, folder, cfg)
    for key, value in read_meta(folder).items():  # the template name and system prompt it was trained with
        if key in GGUF_META_KEYS and value:
            w.add_string(f"{GGUF_META_PREFIX}.{key}", str(value))
    # Two passes: tensor infos first (shapes from the headers), then the data one tensor at a time.
    plan: dict[str, tuple[str, gguf.GGMLQuantizationType]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                new = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise ConfigError(f"{folder}: cannot map tensor {name!r} to GGUF")
                shape = sf.get_slice(name).get_shape()
                kind = gguf.GGMLQuantizationType.F32 if len(shape) <= 1 else qtype  # norms stay F32
                block, size = gguf.GGML_QUANT_SIZES[kind]
                w.add_tensor_info(new, shape, np.dtype(np.float32), int(np.prod(shape)) // block * size, raw_dtype=kind)
                plan[name] = (new, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with tqdm(total=len(plan), desc=f"writing {out.name}", unit="tensor") as bar:
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for name in (n for n in sf.keys() if n in plan):
                    t = sf.get_tensor(name).float()
                    if name.endswith("q_proj.weight"):
                        t = _permute(t, n_head)
                    elif name.endswith("k_proj.weight"):
                        t = _permute(t, n_kv)
                    kind = plan[name][1]
                    data = t.numpy()
                    w.write_tensor_data(data if kind == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(data, kind))
                    bar.update()
    w.close()
    return out


def write_lora_gguf(adapter: str | os.PathLike, base: str | os.PathLike | dict, out: str | os.PathLike) -> Path:
    """A peft LoRA adapter folder as a llama.cpp LoRA adapter GGUF (``general.type = adapter``).

    As llama.cpp's ``convert_lora_to_gguf.py``: for each adapted linear ``blk.N.x.weight`` the file
    holds ``...weight.lora_a`` (A, ``[r, in]``) and ``...weight.lora_b`` (B, ``[out, r]``, with the
    q/k rotary permutation of the base weight), f32, and ``adapter.lora.alpha`` (llama.cpp scales by
    alpha / r; rsLoRA's alpha / sqrt(r) is written as alpha * sqrt(r)). ``base``: the base model's
    folder, or its ``config.json`` as a dict (see ``gguf_config``). Written atomically.
    """
    import gguf
    from safetensors.torch import load_file

    adapter, out = Path(adapter), Path(out)
    acfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if acfg.get("peft_type", "LORA") != "LORA" or acfg.get("use_dora"):
        raise ConfigError(f"{adapter}: only plain LoRA adapters can be exported for llama.cpp (not DoRA or other types)")
    cfg = base if isinstance(base, dict) else json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") not in LLAMA_TYPES:
        raise ConfigError(f"{base}: model_type {cfg.get('model_type')!r}: LoRA GGUF export handles {', '.join(LLAMA_TYPES)}")
    n_layer, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    r, alpha = int(acfg["r"]), float(acfg.get("lora_alpha", acfg["r"]))
    if acfg.get("use_rslora"):
        alpha *= r**0.5
    if acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        raise ConfigError(f"{adapter}: per-module rank/alpha patterns cannot be expressed in a LoRA GGUF")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        new = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if new is None:
            raise ConfigError(f"{adapter}: cannot map the adapted module {module!r} to a GGUF tensor")
        a, b = weights[key].float(), weights[key.replace(".lora_A.", ".lora_B.")].float()
        if module.endswith("q_proj"):
            b = _permute(b, n_head)
        elif module.endswith("k_proj"):
            b = _permute(b, n_kv)
        w.add_tensor(new + ".lora_a", a.contiguous().numpy())
        w.add_tensor(new + ".lora_b", b.contiguous().numpy())
    if any("lora_embedding" in k for k in weights):
        raise ConfigError(f"{adapter}: LoRA on embeddings cannot be exported for llama.cpp")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


def gguf_config(path: str | os.PathLike) -> dict:
    """The few ``config.json`` fields of a LLaMA GGUF that a LoRA export needs (layers, heads)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()

    def get(key: str):
        f = reader.fields.get(f"{arch}.{key}")
        return f.contents() if f is not None else None

    return {"model_type": arch, "num_hidden_layers": get("block_count"), "num_attention_heads": get("attention.head_count"),
            "num_key_value_heads": get("attention.head_count_kv")}


def llama_quantize(src: str | os.PathLike, dst: str | os.PathLike, gguf_type: str, n_threads: int | None = None) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``) from a 16-bit GGUF to ``gguf_type``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED[gguf_type])
    params.nthread = n_threads or len(os.sched_getaffinity(0))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {gguf_type} (code {rc})")


def _run_converter(converter: str, folder: Path, out: Path, outtype: str) -> None:
    script = Path(converter)
    if script.is_dir():
        script = script / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise FileNotFoundError(f"{converter}: llama.cpp's convert_hf_to_gguf.py not found")
    cmd = [sys.executable, str(script), str(folder), "--outfile", str(out), "--outtype", outtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"{script} could not convert {folder}:\n{proc.stderr[-2000:]}")


def export_gguf(
    model: str | None,
    out: str | os.PathLike,
    *,
    adapters: Sequence[str] = (),
    gguf_type: str = "f16",
    converter: str | None = None,
    low_memory: bool = False,
) -> Path:
    """Write ``model`` (merged with ``adapters`` first, in a temp folder) as a ``gguf_type`` GGUF file.

    f32/f16/bf16/q8_0 are written directly; q4_0/q4_k_m/q5_k_m are written as f16 and then
    quantized by llama.cpp. ``low_memory`` merges shard by shard. The file is written next to
    ``out`` and renamed when complete.
    """
    from tqdm.auto import tqdm

    from ..model.load import resolve_base_model
    from .merge import merge_adapters

    if gguf_type not in WRITTEN and gguf_type not in QUANTIZED:
        raise ConfigError(f"--type: expected one of {', '.join([*WRITTEN, *QUANTIZED])}, got {gguf_type!r}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"{out}: the output file should end in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gguf-", dir=out.parent) as tmp:
        if adapters:
            folder = merge_adapters(model, list(adapters), Path(tmp) / "merged", low_memory=low_memory)
        else:
            folder = Path(resolve_base_model(model))
            if not (folder / "config.json").exists():
                raise FileNotFoundError(f"{folder}: not a model folder (no config.json)")
        direct = gguf_type if gguf_type in WRITTEN else "f16"
        first = Path(tmp) / f"model-{direct}.gguf"
        if converter:
            _run_converter(converter, folder, first, direct)
        else:
            write_gguf(folder, first, direct)
        if gguf_type in QUANTIZED:
            with tqdm(total=1, desc=f"llama.cpp quantize -> {gguf_type}", unit="file") as bar:
                llama_quantize(first, Path(tmp) / "q.gguf", gguf_type)
                bar.update()
            first = Path(tmp) / "q.gguf"
        shutil.move(first, out)
    return out
