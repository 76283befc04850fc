"""Chinese vocabulary extension: train a SentencePiece model, merge it into a base tokenizer, measure
the gain, and resize + initialise the model's embeddings for the new tokens.

Two ways to extend, chosen by what the base tokenizer is:

- **SentencePiece** (``tokenizer.model``, LLaMA/LLaMA-2): the new pieces are appended to the base
  model at the protobuf level, as Chinese-LLaMA-Alpaca's ``merge_tokenizers.py`` does (score 0,
  LLaMA 32000 -> 49953). Old pieces keep their ids; the HF tokenizer is rebuilt from the result.
- **Any HF fast tokenizer** (byte-level BPE such as SmolLM2's): the pieces become regular added
  tokens (not special), which the tokenizer splits out before its BPE model runs. Added tokens match
  anywhere, ignoring word boundaries, so only pieces without ASCII characters are taken: an added
  ``"the"`` would otherwise cut ``"other"`` apart.

New embedding rows start as the mean of the old rows of the tokens the new piece splits into under
the old tokenizer, so the resized model predicts exactly as before on text it could already encode.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import ConfigError
from ..data.datasets import DataError, iter_records

SP_MODEL_FILE = "tokenizer.model"
_SKIP_KEYS = {"role", "from", "id", "system"}


def is_chinese(ch: str) -> bool:
    """CJK unified ideographs (basic block, extension A and compatibility ideographs)."""
    o = ord(ch)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F


def count_chinese(text: str) -> int:
    return sum(1 for c in text if is_chinese(c))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in _SKIP_KEYS:
                yield from _strings(v)


def read_texts(paths: Iterable[str]) -> list[str]:
    """Text samples from ``.txt`` (one per blank-line separated paragraph) and JSON/JSONL records
    (``text``, or every string field of the record joined by newlines).

    Raises:
        DataError: unreadable file, or no text at all.
    """
    texts: list[str] = []
    for path in paths:
        for _, record in iter_records(str(path)):
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                text = record["text"]
            else:
                text = "\n".join(s for s in _strings(record) if s.strip())
            if text.strip():
                texts.append(text.strip())
    if not texts:
        raise DataError(f"{', '.join(map(str, paths))}: no text found")
    return texts


def check_out_dir(out: str | os.PathLike, source: str | os.PathLike, marker: str) -> None:
    """``out`` will be replaced as a whole: refuse the source folder itself or a folder that is not ours."""
    out = Path(out)
    if out.exists() and out.resolve() == Path(source).resolve():
        raise ConfigError(f"{out}: the output folder must differ from the input folder")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists())):
        raise ConfigError(f"{out}: exists and holds no {marker}; refusing to replace it (choose a new --out)")


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` only when the block succeeds."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def train_sentencepiece(
    texts: list[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 6000,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    prefix: str = "zh_sp",
    verbose: bool = False,
) -> Path:
    """Train a SentencePiece model on ``texts`` (one sentence per line); returns ``out_dir/prefix.model``.

    ``hard_vocab_limit`` is off so that a small corpus yields a smaller vocabulary instead of an error.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [line.strip() for t in texts for line in t.splitlines() if line.strip()]
    if not lines:
        raise DataError("no text to train on")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(out / prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            hard_vocab_limit=False,
            split_digits=True,
            byte_fallback=False,
            # Keep text as written: the default NFKC rule would fold "，" into "," and learn pieces
            # the base tokenizers (no normalizer) never see.
            normalization_rule_name="identity",
            max_sentence_length=1 << 16,
            num_threads=os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as e:
        raise ConfigError(f"sentencepiece training failed: {e}") from None
    return out / f"{prefix}.model"


def _load_proto(path: str | os.PathLike):
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: SentencePiece model not found")
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(p.read_bytes())
    except Exception:  # protobuf's DecodeError and friends
        raise DataError(f"{p}: not a SentencePiece model file") from None
    return proto


def sp_pieces(path: str | os.PathLike) -> list[str]:
    """The normal (learned) pieces of a SentencePiece model, in model order (no control/byte pieces)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    normal = sp_pb2.ModelProto.SentencePiece.NORMAL
    return [p.piece for p in _load_proto(path).pieces if p.type == normal]


def merge_sentencepiece(
    base_model: str | os.PathLike, new_model: str | os.PathLike, out_file: str | os.PathLike
) -> int:
    """Append the pieces of ``new_model`` the base lacks (score 0, as Chinese-LLaMA did); return the count."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    base = _load_proto(base_model)
    have = {p.piece for p in base.pieces}
    added = 0
    for piece in sp_pieces(new_model):
        if piece in have:
            continue
        new_p = sp_pb2.ModelProto.SentencePiece()
        new_p.piece, new_p.score = piece, 0.0
        base.pieces.append(new_p)
        have.add(piece)
        added += 1
    Path(out_file).write_bytes(base.SerializeToString())
    return added


@dataclass
class ExtendResult:
    method: str
    old_size: int
    new_size: int
    added: int
    skipped_present: int
    skipped_ascii: int


def _find_sp_file(base: Path) -> Path | None:
    return base / SP_MODEL_FILE if (base / SP_MODEL_FILE).is_file() else None


def check_vocab_kept(old_tok, new_tok) -> None:
    """Every old token must keep its id in the new tokenizer (else old embeddings would be misread)."""
    new_vocab = new_tok.get_vocab()
    # sorted by id: get_vocab() comes from a hash map whose order changes from run to run
    moved = sorted((i, t, new_vocab.get(t)) for t, i in old_tok.get_vocab().items() if new_vocab.get(t) != i)
    if moved:
        i, t, j = moved[0]
        raise DataError(
            f"the new tokenizer renumbers {len(moved)} old tokens (e.g. {t!r}: {i} -> {j}); "
            "expected every old token to keep its id"
        )


def extend_tokenizer(base: str, sp_model: str, out_dir: str, method: str = "auto") -> ExtendResult:
    """Merge the pieces of ``sp_model`` into the tokenizer at ``base`` and save the result to ``out_dir``.

    Args:
        base: model or tokenizer folder.
        sp_model: the ``.model`` file from :func:`train_sentencepiece`.
        out_dir: output tokenizer folder (written atomically).
        method: ``sp`` (protobuf merge; needs ``tokenizer.model``), ``added`` (regular added tokens) or
            ``auto`` (``sp`` when the base has ``tokenizer.model``).
    """
    from transformers import AutoTokenizer

    from .load import load_tokenizer

    base_dir = Path(base)
    check_out_dir(out_dir, base, "tokenizer_config.json")
    pieces = sp_pieces(sp_model)  # fail on a bad file before loading anything
    old = load_tokenizer(base)
    sp_file = _find_sp_file(base_dir)
    if method == "auto":
        method = "sp" if sp_file else "added"
    if method == "sp" and sp_file is None:
        raise FileNotFoundError(
            f"{base_dir / SP_MODEL_FILE}: --method sp needs a SentencePiece tokenizer.model"
        )
    with atomic_dir(out_dir) as tmp:
        if method == "sp":
            # The HF tokenizer is rebuilt from the merged tokenizer.model, so tokenizer.json is left out.
            for f in base_dir.iterdir():
                if f.is_file() and (
                    f.name.startswith(("tokenizer_config", "special_tokens_map")) or f.suffix == ".jinja"
                ):
                    shutil.copy(f, tmp / f.name)
            added = merge_sentencepiece(sp_file, sp_model, tmp / SP_MODEL_FILE)
            total = len(pieces)
            new = AutoTokenizer.from_pretrained(str(tmp))
            skipped_ascii = 0
        else:
            new = load_tokenizer(base)
            seen: set[str] = set()
            todo: list[str] = []
            skipped_ascii = total = 0
            for piece in pieces:
                text = piece.replace("\u2581", "")  # SentencePiece's word-start marker
                if not text or text in seen:
                    continue
                seen.add(text)
                total += 1
                if any(ord(c) < 0x80 or c.isspace() for c in text):
                    skipped_ascii += 1
                elif len(old(text, add_special_tokens=False)["input_ids"]) > 1:
                    todo.append(text)
            added = new.add_tokens(todo)
        check_vocab_kept(old, new)
        new.save_pretrained(str(tmp))
        result = ExtendResult(method, len(old), len(new), added, total - added - skipped_ascii, skipped_ascii)
        info = {**asdict(result), "base": str(base), "sp_model": str(sp_model)}
        (tmp / "vocab_extension.json").write_text(
            json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8"
        )
    return result


def token_report(old_tok, new_tok, texts: list[str]) -> dict[str, Any]:
    """Tokens per Chinese character and per sample, before and after, and the reduction in %."""
    chars = sum(count_chinese(t) for t in texts)
    rows = {}
    for name, tok in (("base", old_tok), ("new", new_tok)):
        n = sum(
            len(tok(t, add_special_tokens=False)["input_ids"])
            for t in tqdm(texts, desc=f"tokenizing ({name})", leave=False)
        )
        rows[name] = {
            "vocab_size": len(tok),
            "tokens": n,
            "tokens_per_chinese_char": n / max(chars, 1),
            "tokens_per_sample": n / len(texts),
        }
    reduction = 100.0 * (1 - rows["new"]["tokens"] / max(rows["base"]["tokens"], 1))
    return {"samples": len(texts), "chinese_chars": chars, **rows, "reduction_pct": reduction}


def _sub_ids(old_tok, new_tok, new_id: int, added: dict[int, str]) -> list[int]:
    """Old-tokenizer ids of the text of new token ``new_id``."""
    if new_id in added:  # an added token: its content is plain text
        return old_tok(added[new_id], add_special_tokens=False)["input_ids"]
    # A piece inside the tokenizer's model (SentencePiece merge): split it with the old model alone, in
    # the model's own alphabet ("▁北京"), without the pre-tokenizer adding another word-start marker.
    piece = new_tok.convert_ids_to_tokens(new_id)
    return [t.id for t in old_tok.backend_tokenizer.model.tokenize(piece)]


def resize_model_embeddings(model, old_tokenizer, new_tokenizer, progress: bool = True) -> int:
    """Grow ``embed_tokens`` (and an untied ``lm_head``) to the new vocabulary; returns the rows initialised.

    Each new row is the mean of the OLD rows of the tokens the new piece's text splits into under the
    OLD tokenizer (the same for ``lm_head``). Old rows are unchanged.

    Raises:
        DataError: the new tokenizer renumbers old tokens.
    """
    import torch

    check_vocab_kept(old_tokenizer, new_tokenizer)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    old_emb = emb.weight.detach().float().clone()
    old_head = None if tied or head is None else head.weight.detach().float().clone()
    new_ids = list(range(len(old_tokenizer), len(new_tokenizer)))
    added = {i: t.content for i, t in new_tokenizer.added_tokens_decoder.items() if i >= len(old_tokenizer)}
    rows = max(old_emb.shape[0], len(new_tokenizer))
    if rows != old_emb.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    fallback = list(range(len(old_tokenizer)))  # nothing to split into: the mean of every old row
    with torch.no_grad():
        for i in tqdm(new_ids, desc="initialising new embeddings", disable=not progress, leave=False):
            sub = [
                j for j in _sub_ids(old_tokenizer, new_tokenizer, i, added) if j < old_emb.shape[0]
            ] or fallback
            emb.weight[i] = old_emb[sub].mean(0).to(emb.weight.dtype)
            if old_head is not None:
                head.weight[i] = old_head[sub].mean(0).to(head.weight.dtype)
    return len(new_ids)


def resize_model_folder(base: str, tokenizer_dir: str, out_dir: str) -> tuple[Path, int]:
    """Load ``base``, resize it to the tokenizer in ``tokenizer_dir``, save both to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    from .load import ModelLoadError, explain_load_error, fix_special_tokens, load_tokenizer

    check_out_dir(out_dir, base, "config.json")
    old_tok, new_tok = load_tokenizer(base), load_tokenizer(tokenizer_dir)
    try:  # dtype "auto": keep the checkpoint's own precision
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    except OSError as e:
        raise ModelLoadError(explain_load_error(base, e)) from None
    n = resize_model_embeddings(model, old_tok, new_tok)
    fix_special_tokens(model, new_tok)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        new_tok.save_pretrained(str(tmp))
    return Path(out_dir), n
