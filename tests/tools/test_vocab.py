"""Vocabulary extension: SentencePiece training, both merge methods, the report, resize + init, and
continued pre-training of a resized model."""

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import SAMPLES, make_tiny_llama
from helpers import run_cli as cli

from chinese_vicuna.config import load_config
from chinese_vicuna.data.datasets import DataError
from chinese_vicuna.model.load import load_tokenizer
from chinese_vicuna.model.vocab import (
    count_chinese,
    extend_tokenizer,
    read_texts,
    resize_model_embeddings,
    sp_pieces,
    train_sentencepiece,
)

ROOT = Path(__file__).resolve().parents[2]
ENGLISH = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Language models learn to predict the next token from a large amount of text.",
    "A tokenizer splits text into pieces; a smaller vocabulary means longer sequences.",
    "Training on a laptop is slow, but small models and short sequences make it possible.",
    "Hello world, this is a test of the tokenizer with numbers like 12345 and 2024.",
] * 20


@pytest.fixture(scope="module")
def zh_sp(tmp_path_factory) -> Path:
    """`vocab train` on 90% of the pre-training sample; the rest is written to heldout.txt."""
    out = tmp_path_factory.mktemp("zh-sp")
    p = cli(
        "vocab",
        "train",
        "--input",
        SAMPLES / "pretrain.txt",
        "--out",
        out,
        "--vocab-size",
        "6000",
        "--holdout",
        "0.1",
    )
    assert "trained on 311 samples" in p.stdout and f"held out 34 samples: {out / 'heldout.txt'}" in p.stdout
    return out


@pytest.fixture(scope="module")
def zh_tok(zh_sp, tmp_path_factory) -> Path:
    """`vocab extend` of the embedded SmolLM2 tokenizer (byte-level BPE: added tokens)."""
    out = tmp_path_factory.mktemp("zh-tok") / "tok"
    p = cli("vocab", "extend", "--sp-model", zh_sp / "zh_sp.model", "--out", out)
    assert p.stdout.startswith("added: 49152 -> ") and f"written to {out}" in p.stdout
    return out


@pytest.fixture(scope="module")
def llama_sp_dir(tmp_path_factory) -> Path:
    """A LLaMA-style SentencePiece tokenizer folder (BPE, byte fallback, identity normalisation)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("llama-sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(ENGLISH), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
        normalization_rule_name="identity", character_coverage=1.0,
    )  # fmt: skip
    (d / "tokenizer.vocab").unlink()
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": True}  # fmt: skip
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def test_read_texts_and_chinese_count(tmp_path):
    (tmp_path / "a.txt").write_text("第一段。\n\n第二段\n续行。\n", encoding="utf-8")
    rows = [
        {"text": "你好"},
        {"instruction": "问", "input": "", "output": "答"},
        {"messages": [{"role": "user", "content": "嗨"}]},
    ]
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    assert read_texts([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == [
        "第一段。",
        "第二段\n续行。",
        "你好",
        "问\n答",
        "嗨",
    ]
    assert count_chinese("北京, Beijing，二〇二四") == 5  # 〇 is not a unified ideograph
    (tmp_path / "empty.jsonl").write_text('{"text": "  "}\n')
    with pytest.raises(DataError, match="empty.jsonl: no text found"):
        read_texts([tmp_path / "empty.jsonl"])


def test_report_reduction_on_heldout(zh_sp, zh_tok, tokenizer, tmp_path):
    """The target: >= 35% fewer tokens than SmolLM2's tokenizer on held-out Chinese text."""
    out = tmp_path / "report.json"
    p = cli("vocab", "report", "--new", zh_tok, "--text", zh_sp / "heldout.txt", "--output", out)
    rep = json.loads(out.read_text())
    held = read_texts([zh_sp / "heldout.txt"])
    new = load_tokenizer(str(zh_tok))
    base_n = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in held)
    new_n = sum(len(new(t, add_special_tokens=False)["input_ids"]) for t in held)
    chars = sum(count_chinese(t) for t in held)
    assert rep["samples"] == 34 and rep["chinese_chars"] == chars
    assert rep["base"]["tokens"] == base_n and rep["new"]["tokens"] == new_n
    assert rep["base"]["tokens_per_chinese_char"] == base_n / chars
    assert rep["new"]["tokens_per_sample"] == new_n / 34
    assert rep["reduction_pct"] == pytest.approx(100 * (1 - new_n / base_n))
    assert rep["reduction_pct"] >= 35.0
    assert f"reduction: {rep['reduction_pct']:.1f}% fewer tokens" in p.stdout


def test_added_tokens_are_regular_and_keep_old_behaviour(zh_sp, zh_tok, tokenizer):
    new = load_tokenizer(str(zh_tok))
    info = json.loads((zh_tok / "vocab_extension.json").read_text())
    assert info["method"] == "added" and info["old_size"] == 49152 == len(tokenizer)
    assert info["new_size"] == len(new) == 49152 + info["added"]
    added = {i: t for i, t in new.added_tokens_decoder.items() if i >= len(tokenizer)}
    assert len(added) == info["added"] and not any(t.special for t in added.values())
    pieces = {p.replace("\u2581", "") for p in sp_pieces(zh_sp / "zh_sp.model")}
    assert all(t.content in pieces and all(ord(c) >= 0x80 for c in t.content) for t in added.values())
    beijing = new.convert_tokens_to_ids("北京")
    assert beijing >= len(tokenizer) and new("我在北京", add_special_tokens=False)["input_ids"][-1] == beijing
    text = "Hello world! The tokenizer keeps English as it was: other, there, 12345."
    assert new(text)["input_ids"] == tokenizer(text)["input_ids"]
    for t in read_texts([zh_sp / "heldout.txt"]):
        assert new.decode(new(t, add_special_tokens=False)["input_ids"]) == t


def test_sentencepiece_merge_llama_style(zh_sp, llama_sp_dir, tmp_path):
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    old = load_tokenizer(str(llama_sp_dir))
    out = tmp_path / "llama-zh"
    r = extend_tokenizer(str(llama_sp_dir), str(zh_sp / "zh_sp.model"), str(out))
    base_proto, merged = pb.ModelProto(), pb.ModelProto()
    base_proto.ParseFromString((llama_sp_dir / "tokenizer.model").read_bytes())
    merged.ParseFromString((out / "tokenizer.model").read_bytes())
    have = {p.piece for p in base_proto.pieces}
    want = [p for p in sp_pieces(zh_sp / "zh_sp.model") if p not in have]
    assert r.method == "sp" and r.added == len(want) and r.old_size == len(base_proto.pieces)
    assert [p.piece for p in merged.pieces] == [p.piece for p in base_proto.pieces] + want
    assert all(p.score == 0.0 for p in merged.pieces[len(base_proto.pieces) :])
    assert SentencePieceProcessor(model_file=str(out / "tokenizer.model")).get_piece_size() == r.new_size

    new = load_tokenizer(str(out))
    assert len(new) == r.new_size and new.convert_tokens_to_ids(want[0]) == len(base_proto.pieces)
    english = "The quick brown fox, 12345."
    assert new(english)["input_ids"] == old(english)["input_ids"] and new(english)["input_ids"][0] == 1
    zh = read_texts([zh_sp / "heldout.txt"])[0]
    assert len(new(zh)["input_ids"]) < 0.4 * len(old(zh)["input_ids"])
    assert new.decode(new(zh)["input_ids"], skip_special_tokens=True) == zh

    # resize on the SentencePiece path: a new piece's row is the mean of its old byte-fallback rows
    model = make_tiny_llama(len(old)).eval()
    ids = torch.tensor([old(english)["input_ids"]])
    before = model(ids).logits
    old_emb = model.model.embed_tokens.weight.detach().clone()
    resize_model_embeddings(model, old, new, progress=False)
    assert torch.equal(model(ids).logits[..., : len(old)], before)
    piece = next(
        p for p in want if not p.startswith("\u2581") and len(p) == 2 and all(c not in have for c in p)
    )
    sub = [old.convert_tokens_to_ids(f"<0x{b:02X}>") for b in piece.encode()]
    row = model.model.embed_tokens.weight[new.convert_tokens_to_ids(piece)]
    torch.testing.assert_close(row, old_emb[sub].mean(0), rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_resize_keeps_old_logits_and_initialises_means(zh_tok, tokenizer, tied):
    new = load_tokenizer(str(zh_tok))
    model = make_tiny_llama(len(tokenizer), tie_word_embeddings=tied).eval()
    ids = torch.tensor(
        [tokenizer("Hello, 北京 is the capital. 你好！", add_special_tokens=False)["input_ids"]]
    )
    before = model(ids).logits
    old_emb = model.model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    n = resize_model_embeddings(model, tokenizer, new, progress=False)
    assert n == len(new) - len(tokenizer) and model.config.vocab_size == len(new)
    after = model(ids).logits
    assert after.shape[-1] == len(new)
    assert torch.equal(after[..., : len(tokenizer)], before)  # text of old tokens: identical logits
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert torch.equal(emb[: len(tokenizer)], old_emb) and torch.equal(head[: len(tokenizer)], old_head)
    assert (head.data_ptr() == emb.data_ptr()) == tied
    for word in ("北京", "人民", "中国"):
        i = new.convert_tokens_to_ids(word)
        sub = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert i >= len(tokenizer) and len(sub) > 1
        torch.testing.assert_close(emb[i], old_emb[sub].mean(0), rtol=0, atol=0)
        torch.testing.assert_close(head[i], old_head[sub].mean(0), rtol=0, atol=0)


def test_resize_refuses_a_renumbering_tokenizer(llama_sp_dir, tokenizer):
    model = make_tiny_llama(len(tokenizer))
    with pytest.raises(DataError, match=r"the new tokenizer renumbers \d+ old tokens \(e\.g\. '.+': \d+ -> "):
        resize_model_embeddings(model, tokenizer, load_tokenizer(str(llama_sp_dir)))


def test_resize_refuses_to_overwrite_its_input(zh_tok, tiny_model_dir):
    from chinese_vicuna.config import ConfigError
    from chinese_vicuna.model.vocab import resize_model_folder

    with pytest.raises(ConfigError, match="the output folder must differ from the input folder"):
        resize_model_folder(str(tiny_model_dir), str(zh_tok), str(tiny_model_dir))
    with pytest.raises(ConfigError, match="exists and holds no config.json; refusing to replace it"):
        resize_model_folder(str(tiny_model_dir), str(zh_tok), str(zh_tok))


def test_resize_cli_then_continued_pretraining_learns(zh_tok, tiny_model_dir, tmp_path):
    from chinese_vicuna.train.trainer import run_training

    out = tmp_path / "tiny-zh"
    p = cli("vocab", "resize", "--base", tiny_model_dir, "--tokenizer", zh_tok, "--out", out)
    new = load_tokenizer(str(zh_tok))
    assert f"{len(new) - 49152} new embedding rows initialised; model written to {out}" in p.stdout
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(new)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()

    paras = (SAMPLES / "pretrain.txt").read_text(encoding="utf-8").split("\n\n")[:60]
    data = tmp_path / "zh.txt"
    data.write_text("\n\n".join(paras), encoding="utf-8")
    args = dict(base_model=out, data_path=data, output_dir=tmp_path / "run", cutoff_len=64, val_size=8, max_steps=10,
                micro_batch_size=4, batch_size=4, learning_rate=3e-2, lora_r=4, lora_alpha=8, report_to="none",
                modules_to_save="embed_tokens,lm_head", eval_steps=5, save_steps=1000, logging_steps=1,
                dtype="float32", seed=3)  # fmt: skip
    trainer = run_training(
        load_config(None, [x for k, v in args.items() for x in (f"--{k}", str(v))]), progress_bar=False
    )
    vals = [r["val_loss"] for r in trainer.history if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0] - 0.2
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert "val_loss" in next(csv.reader(f))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any("embed_tokens" in k for k in names) and any("lm_head" in k for k in names)


def test_pretrain_config_is_valid():
    path = ROOT / "configs" / "pretrain-zh-vocab.yaml"
    assert path.read_text().splitlines()[0] == "# chinese-vicuna train configs/pretrain-zh-vocab.yaml"
    cfg = load_config(path)
    assert cfg.lora.modules_to_save == ["embed_tokens", "lm_head"]
    assert (
        cfg.data.data_path == ["data/samples/pretrain.txt"] and cfg.model.base_model == "outputs/smollm2-zh"
    )


def test_train_sentencepiece_sizes_and_errors(tmp_path):
    from chinese_vicuna.config import ConfigError

    texts = read_texts([SAMPLES / "pretrain.txt"])
    model = train_sentencepiece(texts, tmp_path, vocab_size=3000, model_type="unigram", prefix="u")
    assert model == tmp_path / "u.model" and (tmp_path / "u.vocab").exists()
    pieces = sp_pieces(model)
    assert len(pieces) == 3000 - 3  # <unk>, <s>, </s> are not learned pieces
    assert "，" in pieces  # identity normalisation: full-width punctuation is kept as written
    with pytest.raises(
        ConfigError, match="sentencepiece training failed: .*Vocabulary size is smaller than required_chars"
    ):
        train_sentencepiece(texts, tmp_path, vocab_size=1000, model_type="unigram", prefix="small")


@pytest.mark.parametrize(
    "cmd", [["vocab"], ["vocab", "train"], ["vocab", "extend"], ["vocab", "report"], ["vocab", "resize"]]
)
def test_help(cmd):
    out = cli(*cmd, "--help").stdout
    assert out.startswith(f"usage: chinese-vicuna {' '.join(cmd)}")
    if cmd == ["vocab"]:
        for sub in ("train", "extend", "report", "resize"):
            assert sub in out


def main_err(capsys, *args) -> str:
    """Run the CLI in-process (same code path as the console script, no interpreter start-up); its stderr."""
    from chinese_vicuna.cli import main

    assert main([str(a) for a in args]) == 2
    return capsys.readouterr().err


def test_bad_inputs_are_clear(tmp_path, zh_tok, capsys):
    # once through the real entry point: exit status 2, one line, no traceback
    p = cli("vocab", "extend", "--sp-model", tmp_path / "missing.model", "--out", tmp_path / "o", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"error: {tmp_path / 'missing.model'}: SentencePiece model not found"
    assert not (tmp_path / "o").exists()
    (tmp_path / "bad.model").write_bytes(b"not a model")
    err = main_err(capsys, "vocab", "extend", "--sp-model", tmp_path / "bad.model", "--out", tmp_path / "o")
    assert err == f"error: {tmp_path / 'bad.model'}: not a SentencePiece model file\n"
    (tmp_path / "empty.txt").write_text("")
    err = main_err(capsys, "vocab", "train", "--input", tmp_path / "empty.txt", "--out", tmp_path / "sp")
    assert err == f"error: {tmp_path / 'empty.txt'}:1: empty file; expected records\n"
    err = main_err(
        capsys, "vocab", "train", "--input", SAMPLES / "pretrain.txt", "--out", tmp_path, "--holdout", "1.5"
    )
    assert err == "error: --holdout: expected a fraction in [0, 1), got 1.5\n"
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("not a tokenizer")
    err = main_err(capsys, "vocab", "extend", "--sp-model", tmp_path / "bad.model", "--out", keep)
    assert err == (
        f"error: {keep}: exists and holds no tokenizer_config.json; refusing to replace it (choose a new --out)\n"
    )
    assert (keep / "notes.txt").exists()
    err = main_err(capsys, "vocab", "report", "--new", zh_tok, "--text", tmp_path / "nope.txt")
    assert err == f"error: {tmp_path / 'nope.txt'}: file not found\n"


@pytest.mark.slow
def test_smollm2_resize_keeps_its_predictions(zh_tok, tokenizer, tmp_path):
    """The real embedded model: tied embeddings, its own checkpoint dtype, saved and reloaded."""
    from transformers import AutoModelForCausalLM

    from chinese_vicuna.model.load import resolve_base_model
    from chinese_vicuna.model.vocab import resize_model_folder

    base = resolve_base_model(None)
    out, n = resize_model_folder(base, str(zh_tok), str(tmp_path / "smollm2-zh"))
    old = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    new = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    new_tok = load_tokenizer(str(out))
    assert n == len(new_tok) - len(tokenizer) and new.config.tie_word_embeddings
    ids = torch.tensor([tokenizer("北京是中国的首都。Hello!", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits[..., : len(tokenizer)], old(ids).logits, rtol=0, atol=1e-5)
    emb, old_emb = new.get_input_embeddings().weight, old.get_input_embeddings().weight
    i, sub = new_tok.convert_tokens_to_ids("北京"), tokenizer("北京", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(emb[i], old_emb[sub].mean(0), rtol=0, atol=1e-6)
    assert new.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
