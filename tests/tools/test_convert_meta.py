"""`convert-meta`: a tiny random Meta checkpoint (2 model-parallel shards) -> HF -> Meta -> HF.

The HF logits are checked against a reference forward pass written the way Meta's ``model.py``
computes it (complex-number rotary embedding on interleaved pairs), so the q/k permutation is
verified independently of the code that applies it.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli as cli

from chinese_vicuna.config import ConfigError
from chinese_vicuna.tools.convert_meta import hf_to_meta, meta_hidden_dim, meta_to_hf

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}
TEXT = "北京是中国的首都。 Hello world 123"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A LLaMA-style SentencePiece model (BPE, byte fallback, <unk>=0 <s>=1 </s>=2), trained here."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    lines = ["北京是中国的首都。", "上海是一座大城市。", "我们喜欢学习中文。", "The quick brown fox jumps over the lazy dog.",
             "Hello world, this is a tiny LLaMA tokenizer with numbers 123 and 456."] * 5
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        split_digits=True, hard_vocab_limit=False, minloglevel=2,
    )
    return d / "tokenizer.model"


def random_meta_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dim, heads, kv = PARAMS["dim"], PARAMS["n_heads"], PARAMS["n_kv_heads"]
    hd, hidden = dim // heads, meta_hidden_dim(dim, PARAMS["multiple_of"], None)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {"tok_embeddings.weight": r(vocab, dim, scale=1.0), "norm.weight": 1 + r(dim, scale=0.1), "output.weight": r(vocab, dim)}
    for i in range(PARAMS["n_layers"]):
        p = f"layers.{i}."
        state |= {
            p + "attention.wq.weight": r(heads * hd, dim), p + "attention.wk.weight": r(kv * hd, dim),
            p + "attention.wv.weight": r(kv * hd, dim), p + "attention.wo.weight": r(dim, heads * hd),
            p + "feed_forward.w1.weight": r(hidden, dim), p + "feed_forward.w2.weight": r(dim, hidden),
            p + "feed_forward.w3.weight": r(hidden, dim),
            p + "attention_norm.weight": 1 + r(dim, scale=0.1), p + "ffn_norm.weight": 1 + r(dim, scale=0.1),
        }
    return state


def split_model_parallel(state: dict, n: int) -> list[dict]:
    """Split as Meta's ColumnParallel (dim 0) / RowParallel (dim 1) / ParallelEmbedding (dim 1) layers are."""
    col = ("wq", "wk", "wv", "w1", "w3", "output")
    row = ("wo", "w2", "tok_embeddings")
    shards = [{} for _ in range(n)]
    for k, v in state.items():
        name = k.split(".")[-2]
        parts = v.chunk(n, 0) if name in col else v.chunk(n, 1) if name in row else [v] * n
        for s, p in zip(shards, parts):
            s[k] = p.clone()
    return shards


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory, sp_model) -> tuple[Path, dict]:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("llama") / "7B"
    d.mkdir()
    vocab = spm.SentencePieceProcessor(model_file=str(sp_model)).vocab_size()
    state = random_meta_state(vocab)
    for i, shard in enumerate(split_model_parallel(state, 2)):
        torch.save(shard, d / f"consolidated.{i:02d}.pth")
    (d / "params.json").write_text(json.dumps(PARAMS))
    (d.parent / "tokenizer.model").write_bytes(sp_model.read_bytes())  # Meta keeps it one level up
    return d, state


def meta_reference_logits(state: dict, ids: torch.Tensor) -> torch.Tensor:
    """LLaMA as Meta's model.py computes it: complex rotary on interleaved pairs, GQA by repetition."""
    dim, heads, kv, eps = PARAMS["dim"], PARAMS["n_heads"], PARAMS["n_kv_heads"], PARAMS["norm_eps"]
    hd, T = dim // heads, ids.shape[1]

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rope(x):  # (B, T, H, hd): pairs (0,1), (2,3), ... are complex numbers
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)

    h = state["tok_embeddings.weight"][ids]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(PARAMS["n_layers"]):
        p = f"layers.{i}."
        x = norm(h, state[p + "attention_norm.weight"])
        q = rope((x @ state[p + "attention.wq.weight"].T).view(1, T, heads, hd))
        k = rope((x @ state[p + "attention.wk.weight"].T).view(1, T, kv, hd)).repeat_interleave(heads // kv, 2)
        v = (x @ state[p + "attention.wv.weight"].T).view(1, T, kv, hd).repeat_interleave(heads // kv, 2)
        att = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3)) / hd**0.5 + mask
        out = (att.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(1, T, dim)
        h = h + out @ state[p + "attention.wo.weight"].T
        x = norm(h, state[p + "ffn_norm.weight"])
        ff = torch.nn.functional.silu(x @ state[p + "feed_forward.w1.weight"].T) * (x @ state[p + "feed_forward.w3.weight"].T)
        h = h + ff @ state[p + "feed_forward.w2.weight"].T
    return norm(h, state["norm.weight"]) @ state["output.weight"].T


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits


def test_meta_to_hf_matches_meta_forward_and_round_trips(tmp_path, meta_dir, sp_model):
    import sentencepiece as spm

    src, state = meta_dir
    hf = meta_to_hf(src, tmp_path / "hf", max_shard_size="100KB")
    cfg = json.loads((hf / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (192, 2, 400)
    assert (hf / "model.safetensors.index.json").exists() and (hf / "tokenizer.model").exists()
    # the tokenizer: HF ids == SentencePiece ids with BOS
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    ids = [1] + spm.SentencePieceProcessor(model_file=str(sp_model)).encode(TEXT)
    assert tok(TEXT).input_ids == ids and tok.decode(ids, skip_special_tokens=True) == TEXT
    x = torch.tensor([ids])
    ref = meta_reference_logits(state, x)
    got = hf_logits(hf, x)
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()
    # back to Meta: every tensor exactly the original (shards merged), params reproduce the FFN width
    back = hf_to_meta(hf, tmp_path / "meta")
    restored = torch.load(back / "consolidated.00.pth", weights_only=True)
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    params = json.loads((back / "params.json").read_text())
    assert meta_hidden_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")) == 192
    assert (back / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    # and to HF again: bit-identical logits
    again = meta_to_hf(back, tmp_path / "hf2")
    assert torch.equal(hf_logits(again, x), got)


def test_converted_model_exports_to_gguf_with_sentencepiece_vocab(tmp_path, meta_dir):
    """The HF folder feeds export-gguf: llama.cpp tokenizes like HF and greedy decoding agrees."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chinese_vicuna.generation.decode import GenArgs
    from chinese_vicuna.generation.llamacpp import LlamaCppBackend
    from chinese_vicuna.tools.gguf import export_gguf

    hf = meta_to_hf(meta_dir[0], tmp_path / "hf")
    path = export_gguf(str(hf), tmp_path / "m.gguf", gguf_type="f32")
    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok(TEXT).input_ids
    gen = GenArgs(max_new_tokens=16, min_new_tokens=16, repetition_penalty=1.0)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(hf).generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    with LlamaCppBackend(path, n_ctx=128, n_threads=1) as b:
        assert b.token_ids(TEXT) == ids
        assert list(b.iter_ids(ids, gen)) == ref[0, len(ids):].tolist()
    # Chinese-Alpaca style: a [PAD] token added on top of the SentencePiece model (tokenizer.json only)
    import gguf

    tok.add_special_tokens({"pad_token": "[PAD]"})
    model = AutoModelForCausalLM.from_pretrained(hf)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    path = export_gguf(str(hf), tmp_path / "pad.gguf", gguf_type="f32")
    r = gguf.GGUFReader(str(path))
    assert r.fields["tokenizer.ggml.tokens"].contents()[400] == "[PAD]"
    assert r.fields["tokenizer.ggml.padding_token_id"].contents() == 400
    with LlamaCppBackend(path, n_ctx=128, n_threads=1) as b:
        assert b.token_ids(TEXT + "[PAD]") == tok(TEXT + "[PAD]").input_ids


def test_tied_hf_model_and_missing_tokenizer(tmp_path, tiny_model_dir):
    """SmolLM2-style folders: no tokenizer.model (warned), an lm_head tied to the embeddings."""
    from helpers import make_tiny_llama
    from transformers import AutoModelForCausalLM

    make_tiny_llama(120, tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    out = hf_to_meta(tmp_path / "tied", tmp_path / "meta")
    state = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    assert not (out / "tokenizer.model").exists()
    back = meta_to_hf(out, tmp_path / "hf")  # its parent folder has no tokenizer.model either
    x = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")(x).logits
    assert torch.equal(hf_logits(back, x), ref)


def test_errors(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="no params.json"):
        meta_to_hf(tmp_path, tmp_path / "o")
    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    with pytest.raises(FileNotFoundError, match=r"no consolidated\.\*\.pth"):
        meta_to_hf(tmp_path, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf_to_meta(tmp_path, tmp_path / "o")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        hf_to_meta(tiny_model_dir, tmp_path)


def test_cli_convert_meta(tmp_path, meta_dir):
    assert "--to {hf,meta}" in cli("convert-meta", "--help").stdout
    p = cli("convert-meta", "--to", "hf", "--input", meta_dir[0], "--out", tmp_path / "hf", "--max-position-embeddings", "4096")
    assert f"converted {meta_dir[0]} -> {tmp_path / 'hf'} (Hugging Face format)" in p.stdout
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"] == 4096
    bad = cli("convert-meta", "--to", "hf", "--input", tmp_path / "missing", "--out", tmp_path / "o", check=False)
    assert bad.returncode == 2 and f"error: {tmp_path / 'missing'}: no params.json" in bad.stderr
