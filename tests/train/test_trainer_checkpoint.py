"""``resume`` from a transformers ``Trainer`` checkpoint (what the seeds' ``finetune_others_continue`` resumes).

A real Trainer runs a PEFT LoRA on the tiny model and saves ``checkpoint-2``; our trainer must
start from its adapter weights, its AdamW moments (checked against the live Trainer optimizer, by
parameter, not by index) and its global step, then keep training.
"""

import json
import math
import os
import shutil

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from chinese_vicuna.config import load_config
from chinese_vicuna.train.trainer import Trainer

STEPS = 2


# LoRA only: one weight-decay group. With the final norm and lm_head trained in full, the Trainer
# puts the norm in its no-decay group, after lm_head, so its index order differs from the model's.
MODULES_TO_SAVE = {"lora": None, "lora+norm+lm_head": ["model.norm", "lm_head"]}


@pytest.fixture(scope="module", params=list(MODULES_TO_SAVE))
def hf_checkpoint(request, tmp_path_factory, tiny_model_dir):
    """(Trainer checkpoint folder, {parameter name: the Trainer's AdamW state for it}, modules_to_save)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments
    from transformers import Trainer as HFTrainer

    out = tmp_path_factory.mktemp("hf-trainer")
    torch.manual_seed(0)
    extra = MODULES_TO_SAVE[request.param]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], modules_to_save=extra,
                   task_type="CAUSAL_LM"),
    )  # fmt: skip
    rows = [torch.randint(3, 1000, (16,)).tolist() for _ in range(8)]
    data = [{"input_ids": r, "attention_mask": [1] * 16, "labels": r} for r in rows]
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, save_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
        weight_decay=0.01, report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = HFTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    groups = [len(g["params"]) for g in trainer.optimizer.param_groups]
    assert groups == ([8, 0] if extra is None else [9, 1])  # 2 layers x q,v x A,B (+ lm_head | + norm)
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
    ckpt = out / f"checkpoint-{STEPS}"
    for f in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"):
        assert (ckpt / f).exists(), f
    return ckpt, moments, extra


def our_config(base, data, out, resume, *extra):
    return load_config(None, [
        "--base_model", str(base), "--data_path", str(data), "--output_dir", str(out), "--resume", str(resume),
        "--lora_r", "4", "--lora_alpha", "8", "--max_steps", str(STEPS + 2), "--micro_batch_size", "2",
        "--batch_size", "2", "--cutoff_len", "64", "--dtype", "float32", "--report_to", "none", "--save_steps", "1000",
        *extra,
    ])  # fmt: skip


@pytest.mark.parametrize("layout", ["peft", "chinese-vicuna"])
def test_resume_from_a_trainer_checkpoint(hf_checkpoint, tiny_model_dir, alpaca_file, tmp_path, layout):
    ckpt, moments, modules_to_save = hf_checkpoint
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    if layout == "chinese-vicuna":
        # finetune.py overrode state_dict with the adapter's: the Trainer saved it as pytorch_model.bin
        folder = tmp_path / "checkpoint-2"
        shutil.copytree(ckpt, folder)
        torch.save(adapter, folder / "pytorch_model.bin")
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            (folder / f).unlink()
        ckpt = folder
    global_step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    extra = ["--modules_to_save", ",".join(modules_to_save)] if modules_to_save else []
    cfg = our_config(tiny_model_dir, alpaca_file, tmp_path / "run", ckpt, *extra)
    trainer = Trainer(cfg, progress_bar=False).setup()
    assert trainer.progress.step == global_step == STEPS
    assert trainer.scheduler.last_epoch == STEPS
    model = trainer.accelerator.unwrap_model(trainer.wrapper).model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved_name = {n: n.replace(".modules_to_save", "").replace(".default", "") for n in trainable}
    assert set(saved_name.values()) == set(adapter)
    state = trainer.optimizer.optimizer.state
    assert set(moments) == set(trainable)
    for name, p in trainable.items():
        torch.testing.assert_close(p.detach(), adapter[saved_name[name]], atol=0, rtol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[p][key], moments[name][key], atol=0, rtol=0)
        assert float(state[p]["step"]) == STEPS
    before = {n: p.detach().clone() for n, p in trainable.items()}
    trainer.train()
    assert trainer.progress.step == STEPS + 2
    assert [r["step"] for r in trainer.history][-1] == STEPS + 2
    assert all(math.isfinite(r["loss"]) for r in trainer.history if "loss" in r)
    assert any(not torch.equal(before[n], p) for n, p in trainable.items())
    assert all(float(trainer.optimizer.optimizer.state[p]["step"]) == STEPS + 2 for p in trainable.values())


def test_trainer_checkpoint_with_other_lora_settings_is_a_clear_error(hf_checkpoint, tiny_model_dir, alpaca_file,
                                                                       tmp_path):  # fmt: skip
    ckpt, _, modules_to_save = hf_checkpoint
    if modules_to_save:
        pytest.skip("one LoRA layout is enough for the error message")
    p = run_cli("train", "--base_model", tiny_model_dir, "--data_path", alpaca_file, "--output_dir", tmp_path / "o",
                "--resume", ckpt, "--lora_r", "8", "--max_steps", "3", "--report_to", "none", check=False,
                env={**os.environ})  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"error: {ckpt}: the adapter does not fit this model" in p.stderr
    assert "lora_r, lora_target_modules" in p.stderr
