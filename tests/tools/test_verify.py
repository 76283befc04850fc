"""`verify manifest` and `verify tokenizer` on deliberately broken model folders."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import run_cli as cli

from chinese_vicuna.config import ConfigError
from chinese_vicuna.tools.verify import apply_token_fixes, check_manifest, check_tokenizer, write_manifest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def folder(tmp_path, tiny_model_dir) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    (d / "sub").mkdir()
    (d / "sub" / "notes.txt").write_text("中文说明\n", encoding="utf-8")
    return d


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_manifest_round_trip_and_tampering(folder):
    import hashlib

    path, n = write_manifest(folder)
    lines = path.read_text().splitlines()
    assert n == len(lines) == len([p for p in folder.rglob("*") if p.is_file()]) - 1
    digest = hashlib.sha256((folder / "sub" / "notes.txt").read_bytes()).hexdigest()
    assert f"{digest}  sub/notes.txt" in lines  # sha256sum format
    report = check_manifest(folder)
    assert report.ok and len(report.ok_files) == n and report.lines() == [f"OK: {n} files match SHA256SUMS"]

    with open(folder / "model.safetensors", "r+b") as f:  # flip one byte
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    (folder / "tokenizer.json").unlink()
    (folder / "extra.log").write_text("x")
    report = check_manifest(folder)
    assert not report.ok
    assert (report.mismatched, report.missing, report.extra) == (["model.safetensors"], ["tokenizer.json"], ["extra.log"])
    assert report.lines()[:3] == ["model.safetensors: FAILED (checksum differs)", "tokenizer.json: MISSING", "extra.log: not in SHA256SUMS"]
    assert report.lines()[-1] == f"1 changed, 1 missing of {n} files in SHA256SUMS"


def test_manifest_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest; write one with `verify manifest --write"):
        check_manifest(folder)
    (folder / "SHA256SUMS").write_text("abc config.json\n")
    with pytest.raises(ValueError, match=r"SHA256SUMS:1: expected '<sha256>  <file>'"):
        check_manifest(folder)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        write_manifest(tmp_path / "nope")


def test_tokenizer_ids_consistent_then_broken_then_fixed(folder, tokenizer):
    assert check_tokenizer(folder) == []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    edit_json(folder / "config.json", eos_token_id=0, pad_token_id=None)
    edit_json(folder / "generation_config.json", eos_token_id=[7, 8], bos_token_id=5)
    probs = check_tokenizer(folder)
    got = [(p.file, p.key, p.have, p.want) for p in probs]
    assert got == [
        ("generation_config.json", "bos_token_id", 5, tokenizer.bos_token_id),
        ("config.json", "eos_token_id", 0, eos),
        ("generation_config.json", "eos_token_id", [7, 8], [eos, 7, 8]),
        ("config.json", "pad_token_id", None, pad),
    ]
    assert probs[1].fix == f'set "eos_token_id": {eos}'
    before = json.loads((folder / "config.json").read_text())
    assert sorted(apply_token_fixes(folder, probs)) == ["config.json", "generation_config.json"]
    assert check_tokenizer(folder) == []
    after = json.loads((folder / "config.json").read_text())
    assert {k: v for k, v in after.items() if k not in ("eos_token_id", "pad_token_id")} == {
        k: v for k, v in before.items() if k not in ("eos_token_id", "pad_token_id")}
    assert not list(folder.glob("*.tmp"))


def test_missing_generation_config_and_out_of_range_ids(folder, tokenizer):
    (folder / "generation_config.json").unlink()
    probs = check_tokenizer(folder)
    assert {p.key for p in probs if p.file == "generation_config.json"} == {"bos_token_id", "eos_token_id", "pad_token_id"}
    apply_token_fixes(folder, probs)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    edit_json(folder / "config.json", vocab_size=2)  # the tokenizer's EOS (id 2) has no embedding row
    probs = check_tokenizer(folder)
    assert [(p.file, p.key, p.fix) for p in probs] == [("tokenizer", "eos_token_id", None)]
    with pytest.raises(ConfigError, match="outside the 2 embedding rows; resize the embeddings"):
        apply_token_fixes(folder, probs)


def test_cli_verify(folder):
    assert "manifest" in cli("verify", "--help").stdout and "--fix" in cli("verify", "tokenizer", "--help").stdout
    p = cli("verify", "manifest", "--write", "--model", folder)
    assert p.stdout.startswith(f"wrote {folder / 'SHA256SUMS'} (")
    assert cli("verify", "manifest", "--model", folder).stdout.startswith("OK: ")
    (folder / "sub" / "notes.txt").write_text("changed")
    bad = cli("verify", "manifest", "--check", "--model", folder, check=False)
    assert bad.returncode == 1 and "sub/notes.txt: FAILED (checksum differs)" in bad.stdout

    edit_json(folder / "config.json", eos_token_id=0)
    bad = cli("verify", "tokenizer", "--model", folder, check=False)
    assert bad.returncode == 1
    assert 'config.json: eos_token_id is 0, expected 2  (fix: set "eos_token_id": 2)' in bad.stdout
    fixed = cli("verify", "tokenizer", "--model", folder, "--fix")
    assert "fixed config.json" in fixed.stdout
    assert "ids agree between the tokenizer, config.json and generation_config.json" in cli("verify", "tokenizer", "--model", folder).stdout
    missing = cli("verify", "manifest", "--model", folder / "nope", check=False)
    assert missing.returncode == 2 and f"error: {folder / 'nope'}: not a folder" in missing.stderr
