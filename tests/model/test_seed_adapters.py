"""Adapters as the seed projects published them (peft 0.2/0.3, 2023) load, merge and initialise training.

The legacy folder is built from a real peft LoRA with non-zero ``lora_B``: its tensors are written
under the old key names into ``adapter_model.bin`` (a torch pickle) next to a 2023-style
``adapter_config.json`` (``enable_lora``, ``merge_weights``, a base that exists nowhere). Every
path must reproduce that peft model's logits exactly.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from chinese_vicuna.config import load_config
from chinese_vicuna.model.adapters import load_for_inference, normalize_adapter_keys
from chinese_vicuna.model.load import ModelLoadError
from chinese_vicuna.tools.merge import merge_adapters

IDS = torch.tensor([[1, 17, 305, 4021, 9, 77, 31000, 12, 5, 6]])
SEED_BASE = "decapoda-research/llama-7b-hf"


def seed_config(r: int, alpha: int) -> dict:
    """adapter_config.json as peft 0.2 wrote it for Chinese-Vicuna's released LoRAs."""
    return {
        "base_model_name_or_path": SEED_BASE, "bias": "none", "enable_lora": None, "fan_in_fan_out": False,
        "inference_mode": True, "lora_alpha": alpha, "lora_dropout": 0.05, "merge_weights": False,
        "modules_to_save": None, "peft_type": "LORA", "r": r, "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
    }  # fmt: skip


@pytest.fixture(scope="module")
def seed_adapter(tmp_path_factory, tiny_model_dir):
    """(legacy adapter folder, logits of the peft model it was written from, its LoRA tensors by old key)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("seed-adapter")
    torch.manual_seed(3)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    with torch.no_grad():
        logits = model(IDS).logits
    # peft 0.2 had no adapter names: `...q_proj.lora_A.weight`, never `...q_proj.lora_A.default.weight`
    state = {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert len(state) == 2 * 2 * 2 and all(k.startswith("base_model.model.model.layers.") for k in state)
    torch.save(state, d / "adapter_model.bin")
    (d / "adapter_config.json").write_text(json.dumps(seed_config(4, 8), indent=2))
    return d, logits, state


def test_seed_adapter_loads_for_inference(seed_adapter, tiny_model_dir, capsys):
    folder, want, _ = seed_adapter
    model, _, meta = load_for_inference(str(tiny_model_dir), [str(folder)], dtype="float32")
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert meta == {}
    err = capsys.readouterr().err
    assert f"note: {folder}: ignoring adapter_config.json keys unknown to this peft version" in err
    assert "enable_lora, merge_weights" in err


@pytest.mark.parametrize("low_memory", [False, True], ids=["in-memory", "low-memory"])
def test_seed_adapter_merges(seed_adapter, tiny_model_dir, tmp_path, low_memory):
    from transformers import AutoModelForCausalLM

    folder, want, _ = seed_adapter
    out = merge_adapters(str(tiny_model_dir), [str(folder)], tmp_path / "merged", low_memory=low_memory)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = merged(IDS).logits
    # docs/export.md: in fp32 merged and unmerged logits agree to 5e-5 (each fp32 forward rounds that much;
    # how much depends on the CPU's kernels: 1.9e-5 measured on an AVX2 CPU)
    torch.testing.assert_close(got, want, atol=5e-5, rtol=0)


def test_seed_adapter_initialises_training(seed_adapter, tiny_model_dir, alpaca_file, tmp_path):
    from chinese_vicuna.train.trainer import Trainer

    folder, _, state = seed_adapter
    cfg = load_config(None, [
        "--base_model", str(tiny_model_dir), "--data_path", str(alpaca_file), "--output_dir", str(tmp_path / "run"),
        "--init_adapter", str(folder), "--dtype", "float32", "--report_to", "none", "--max_steps", "1",
        "--micro_batch_size", "2", "--batch_size", "2", "--cutoff_len", "64",
    ])  # fmt: skip
    trainer = Trainer(cfg, progress_bar=False).setup()
    model = trainer.accelerator.unwrap_model(trainer.wrapper).model
    trainable = {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(state)
    for name, value in state.items():
        torch.testing.assert_close(trainable[name].detach(), value, atol=0, rtol=0)


def test_seed_adapter_without_its_base_is_a_clear_error(seed_adapter, tmp_path):
    folder = seed_adapter[0]
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    import os

    p = run_cli("generate", "--adapter", folder, "--prompt", "你好", check=False, env={**os.environ, **env})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"error: {folder}: trained on {SEED_BASE}, which is not available here" in p.stderr
    assert "--model" in p.stderr


def test_old_key_forms_are_normalised():
    t = torch.zeros(1)
    state = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": t,  # a PeftModel.state_dict()
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": t,  # its frozen base weight
        "base_model.model.lm_head.modules_to_save.default.weight": t,
        "base_model.model.lm_head.original_module.weight": t,
        "model.layers.1.self_attn.v_proj.lora_B.weight": t,  # saved from the inner model
        "base_model.model.model.embed_tokens.lora_embedding_A": t,
    }
    assert sorted(normalize_adapter_keys(state)) == sorted([
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.lm_head.weight",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A",
    ])  # fmt: skip


def test_unsafe_or_mismatched_weights_are_clear_errors(seed_adapter, tiny_model_dir, tmp_path):
    folder, _, state = seed_adapter
    bad = tmp_path / "pickle"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    torch.save({"weights": state, "callback": Path}, bad / "adapter_model.bin")  # not a plain tensor dict
    with pytest.raises(ModelLoadError, match="adapter_model.bin: not a plain tensor file"):
        load_for_inference(str(tiny_model_dir), [str(bad)], dtype="float32")
    wrong = tmp_path / "rank"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text(json.dumps(seed_config(8, 16)))  # says r=8, tensors are r=4
    torch.save(state, wrong / "adapter_model.bin")
    with pytest.raises(ModelLoadError, match=f"{wrong}: the adapter does not fit this model .*trained on {SEED_BASE}"):
        load_for_inference(str(tiny_model_dir), [str(wrong)], dtype="float32")


def test_resized_embeddings_saved_by_peft_load_like_peft(tiny_model_dir, tmp_path):
    """An adapter trained on a grown vocabulary without modules_to_save: peft saves the resized
    embedding under the base's own names (save_embedding_layers) and loads it into the base."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from chinese_vicuna.model.adapters import load_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = model.get_input_embeddings().weight.shape[0] + 8
    model.resize_token_embeddings(rows, mean_resizing=False)
    torch.manual_seed(5)
    with torch.no_grad():
        model.get_input_embeddings().weight[-8:].normal_()
        model.get_output_embeddings().weight[-8:].normal_()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "grown", save_embedding_layers=True)
    ids = torch.cat([IDS, torch.tensor([[rows - 1, rows - 8]])], dim=1)
    ref_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref_base.resize_token_embeddings(rows, mean_resizing=False)
    ref = PeftModel.from_pretrained(ref_base, tmp_path / "grown").eval()
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "grown"))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_folder_name_with_a_dot_names_the_adapter(seed_adapter, tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "lora-v1.5"  # a "." cannot be a peft adapter name (a ModuleDict key)
    shutil.copytree(seed_adapter[0], folder)
    model, _, _ = load_for_inference(str(tiny_model_dir), [str(folder)], dtype="float32")
    assert model.active_adapter == "lora-v1_5"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, seed_adapter[1], atol=1e-5, rtol=0)
