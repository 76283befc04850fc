"""Original Meta LLaMA checkpoints (``consolidated.*.pth`` + ``params.json`` + ``tokenizer.model``) <-> HF.

Meta's attention applies rotary embeddings to interleaved pairs of each head's dimensions; HF's
``LlamaAttention`` rotates the two halves (``rotate_half``). ``permute`` reorders the rows of
``wq``/``wk`` so both compute the same thing (the permutation of transformers'
``convert_llama_weights_to_hf.py``); ``unpermute`` is its inverse, as in the seed's export script.
Model-parallel shards (13B: 2, 33B: 4, 65B: 8) are concatenated the way Meta split them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..config import ConfigError

# Meta name -> (HF name, dim along which model-parallel shards are concatenated; None = replicated)
LAYER_MAP = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
TOP_MAP = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (interleaved rotary pairs) -> HF (half-split) row order of a q/k projection."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta: the inverse of :func:`permute`."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The feed-forward width Meta's ``model.py`` derives from ``params.json``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_params(dim: int, intermediate: int) -> dict:
    """``multiple_of`` (+ ``ffn_dim_multiplier`` if needed) that reproduce ``intermediate`` in Meta's code."""
    for m in (4096, 2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_hidden_dim(dim, m, None) == intermediate:
            return {"multiple_of": m}
    base = int(2 * (4 * dim) / 3)
    mult = (intermediate + 0.5) / base  # int(mult * base) == intermediate, no float round-down
    assert meta_hidden_dim(dim, 1, mult) == intermediate
    return {"multiple_of": 1, "ffn_dim_multiplier": mult}


def _find_tokenizer(folder: Path) -> Path | None:
    # Meta ships tokenizer.model next to the size folders (llama/7B, llama/tokenizer.model).
    for cand in (folder / "tokenizer.model", folder.parent / "tokenizer.model"):
        if cand.exists():
            return cand
    return None


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out}: exists and is not empty (pass --force to replace it)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def meta_to_hf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_position_embeddings: int | None = None,
    max_shard_size: str | int = "2GB",
    force: bool = False,
) -> Path:
    """Convert a Meta checkpoint folder to a safetensors HF ``LlamaForCausalLM`` folder (+ tokenizer)."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, LlamaConfig

    from .merge import ShardWriter, parse_size

    src, out = Path(src), Path(out)
    if not (src / "params.json").exists():
        raise FileNotFoundError(f"{src}: no params.json (expected a Meta checkpoint folder)")
    shards = sorted(src.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{src}: no consolidated.*.pth files")
    params = json.loads((src / "params.json").read_text(encoding="utf-8"))
    n_layers, n_heads, dim = params["n_layers"], params["n_heads"], params["dim"]
    n_kv = params.get("n_kv_heads") or n_heads
    # mmap: tensors are read from disk as they are used, so memory holds about one layer.
    states = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in shards]
    tmp = _prepare_out(out, force)

    def merged(meta_name: str, cat_dim: int | None) -> torch.Tensor:
        parts = [s[meta_name] for s in states]
        return parts[0] if cat_dim is None or len(parts) == 1 else torch.cat(parts, dim=cat_dim)

    writer = ShardWriter(tmp, parse_size(max_shard_size))
    dtype = states[0]["tok_embeddings.weight"].dtype
    intermediate = 0
    for i in tqdm(range(n_layers), desc="converting layers", unit="layer"):
        for meta_name, (hf_name, cat) in LAYER_MAP.items():
            w = merged(f"layers.{i}.{meta_name}", cat)
            if meta_name == "attention.wq.weight":
                w = permute(w, n_heads)
            elif meta_name == "attention.wk.weight":
                w = permute(w, n_kv)
            elif meta_name == "feed_forward.w1.weight":
                intermediate = w.shape[0]
            writer.add(f"model.layers.{i}.{hf_name}", w)
    for meta_name, (hf_name, cat) in TOP_MAP.items():
        writer.add(hf_name, merged(meta_name, cat))
    vocab = merged("tok_embeddings.weight", 1).shape[0]
    writer.close()
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=max_position_embeddings or params.get("max_seq_len") or 2048,
        rms_norm_eps=params.get("norm_eps", 1e-6),
        rope_theta=params.get("rope_theta", 10000.0),
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["LlamaForCausalLM"],
        dtype=dtype,
    )
    config.save_pretrained(tmp)
    GenerationConfig.from_model_config(config).save_pretrained(tmp)
    tok_file = _find_tokenizer(src)
    if tok_file is None:
        print(f"warning: no tokenizer.model in {src} or its parent folder: the HF folder has no tokenizer")
    else:
        from transformers import LlamaTokenizer

        tokenizer_dir = tmp / "_sp"
        tokenizer_dir.mkdir()
        shutil.copy(tok_file, tokenizer_dir / "tokenizer.model")
        LlamaTokenizer.from_pretrained(tokenizer_dir, add_bos_token=True, add_eos_token=False).save_pretrained(tmp)
        # kept for llama.cpp's SentencePiece vocabulary and for converting back to Meta format
        shutil.move(tokenizer_dir / "tokenizer.model", tmp / "tokenizer.model")
        tokenizer_dir.rmdir()
    return _finish(tmp, out)


def hf_to_meta(src: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Convert an HF LLaMA folder to Meta's layout (one ``consolidated.00.pth``, ``params.json``)."""
    from safetensors import safe_open

    from .merge import weight_files

    src, out = Path(src), Path(out)
    cfg_file = src / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{src}: no config.json (expected a Hugging Face model folder)")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if cfg.get("model_type") != "llama":
        raise ConfigError(f"{src}: model_type {cfg.get('model_type')!r}; Meta's format is for LLaMA models")
    files = weight_files(src)
    if not files:
        raise ConfigError(f"{src}: no safetensors weights")
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    to_meta = {f"model.layers.{{}}.{hf}": f"layers.{{}}.{meta}" for meta, (hf, _) in LAYER_MAP.items()}
    top = {hf: meta for meta, (hf, _) in TOP_MAP.items()}
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                w = sf.get_tensor(name)
                if name in top:
                    state[top[name]] = w
                    continue
                parts = name.split(".")
                if len(parts) < 4 or parts[1] != "layers":
                    continue  # rotary buffers and the like
                key = to_meta.get(".".join(parts[:2] + ["{}"] + parts[3:]))
                if key is None:
                    raise ConfigError(f"{src}: unexpected tensor {name!r} for a LLaMA model")
                if name.endswith("q_proj.weight"):
                    w = unpermute(w, n_heads)
                elif name.endswith("k_proj.weight"):
                    w = unpermute(w, n_kv)
                state[key.format(parts[2])] = w
    if "output.weight" not in state:  # tied embeddings (HF omits lm_head)
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    tmp = _prepare_out(out, force)
    torch.save(state, tmp / "consolidated.00.pth")
    params = {
        "dim": cfg["hidden_size"],
        "n_layers": cfg["num_hidden_layers"],
        "n_heads": n_heads,
        **({"n_kv_heads": n_kv} if n_kv != n_heads else {}),
        **_ffn_params(cfg["hidden_size"], cfg["intermediate_size"]),
        "norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "vocab_size": state["tok_embeddings.weight"].shape[0],
        "rope_theta": float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))),
        "max_seq_len": cfg.get("max_position_embeddings", 2048),
    }
    (tmp / "params.json").write_text(json.dumps(params, indent=2), encoding="utf-8")
    if (src / "tokenizer.model").exists():
        shutil.copy(src / "tokenizer.model", tmp / "tokenizer.model")
    else:
        print(f"warning: {src} has no tokenizer.model (SentencePiece): the Meta folder has no tokenizer")
    return _finish(tmp, out)
