"""The real embedded SmolLM2-135M model: GGUF import fidelity and a short end-to-end run (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SAMPLES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_imported_folder_matches_gguf_logits():
    from transformers import AutoModelForCausalLM

    from chinese_vicuna.model.load import embedded_gguf, load_model_and_tokenizer

    gguf = embedded_gguf()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model, tok = load_model_and_tokenizer(None, dtype="float32")
    ids = tok("介绍一下长城。", return_tensors="pt").input_ids
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    # a .gguf file is accepted as base_model directly too
    direct, direct_tok = load_model_and_tokenizer(str(gguf), dtype="float32")
    assert direct_tok("介绍一下长城。").input_ids == ids[0].tolist()
    torch.testing.assert_close(direct(ids).logits, ref(ids).logits)
    assert tok.pad_token_id != tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_smollm2_short_training_and_answer(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "chinese_vicuna", "train", str(ROOT / "configs" / "demo.yaml"), "--max_steps", "3",
         "--output_dir", str(out), "--report_to", "none", "--val_size", "8", "--eval_steps", "3"],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert len(rows) >= 2
    proc = subprocess.run(
        [sys.executable, "-m", "chinese_vicuna", "generate", "--adapter", str(out), "--input",
         str(SAMPLES / "heldout.jsonl"), "--output", str(tmp_path / "gen.jsonl"), "--max-new-tokens", "16"],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(answers) == 5 and all(a["output"] for a in answers)
