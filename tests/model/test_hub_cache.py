"""Base models and adapters given by hub id resolve through a pre-populated Hugging Face cache, offline."""

import hashlib
import os
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from chinese_vicuna.model.adapters import load_for_inference

IDS = torch.tensor([[1, 17, 305, 4021, 9, 77, 31000, 12, 5, 6]])
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay ``source``'s files out as huggingface_hub does: blobs by hash, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_model_dir, tiny_adapter_dir) -> Path:
    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    cache_repo(cache, "tester/tiny-llama", tiny_model_dir)
    cache_repo(cache, "tester/tiny-lora", tiny_adapter_dir)
    return cache


def test_hub_ids_load_from_the_cache_offline(hub_cache, tiny_model_dir, tiny_adapter_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok, meta = load_for_inference("tester/tiny-llama", ["tester/tiny-lora"], dtype="float32")
    assert meta["template"] == "alpaca"
    assert model.active_adapter == "tiny-lora"  # named after the repository, like a folder
    ref, ref_tok, _ = load_for_inference(str(tiny_model_dir), [str(tiny_adapter_dir)], dtype="float32")
    assert tok.get_vocab() == ref_tok.get_vocab()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, atol=1e-5, rtol=0)


def test_merge_by_hub_id_and_uncached_ids_are_clear_errors(hub_cache, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "merged"
    p = run_cli("merge", "--model", "tester/tiny-llama", "--adapter", "tester/tiny-lora", "--out", out,
                "--low-memory", env=env)  # fmt: skip
    assert "merged 1 adapter(s)" in p.stdout and (out / "model.safetensors").exists()
    for flag, repo in [("--adapter", "nobody/missing-lora"), ("--model", "nobody/missing-base")]:
        args = ["generate", flag, repo, "--prompt", "你好"]
        if flag == "--model":
            args += ["--adapter", "tester/tiny-lora"]
        p = run_cli(*args, check=False, env=env)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert f"error: {repo}: not a local folder, and it could not be fetched from the Hugging Face hub" in p.stderr
        assert f"not in the cache at {hub_cache}" in p.stderr and "HF_HUB_OFFLINE is set" in p.stderr
        assert f"hf download {repo}" in p.stderr
