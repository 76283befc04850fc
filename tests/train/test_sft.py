"""The trainer end to end on a tiny model: learning, outputs, exact resume, accumulation, continue."""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chinese_vicuna.config import load_config
from chinese_vicuna.train.checkpoint import find_resume, list_checkpoints
from chinese_vicuna.train.sft import run_training

ROOT = Path(__file__).resolve().parents[2]


def overrides(base, data, out, **kw):
    args = dict(
        base_model=base, data_path=data, output_dir=out, micro_batch_size=2, batch_size=4, learning_rate=5e-3,
        cutoff_len=64, lora_r=4, lora_alpha=8, lora_dropout=0.1, logging_steps=1, report_to="none", seed=7,
        save_steps=1000, eval_steps=1000, group_by_length="false", dtype="float32",
    )
    args.update(kw)
    out_list = []
    for k, v in args.items():
        out_list += [f"--{k}", str(v)]
    return out_list


def losses(out_dir):
    with open(Path(out_dir) / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


def adapter(out_dir):
    return load_file(str(Path(out_dir) / "adapter_model.safetensors"))


def test_training_learns_and_writes_outputs(tiny_model_dir, alpaca_file, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, overrides(tiny_model_dir, alpaca_file, out, max_steps=30, val_size=4, eval_steps=10,
                                      lora_target_modules="all-linear", lora_r=8, learning_rate=1e-2))
    trainer = run_training(cfg, progress_bar=False)
    ls = losses(out)
    assert sum(list(ls.values())[-5:]) / 5 < sum(list(ls.values())[:5]) / 5 - 0.5  # loss goes down
    vals = [r["val_loss"] for r in trainer.history if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]
    for name in ["adapter_config.json", "adapter_model.safetensors", "run_config.yaml", "chinese_vicuna.json",
                 "loss.png", "metrics.csv", "tokenizer_config.json"]:
        assert (out / name).exists(), name
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-30"]
    # a plain PEFT load works and reproduces our trained model's logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = PeftModel.from_pretrained(base, out).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    ours = trainer.accelerator.unwrap_model(trainer.wrapper).model.eval()
    torch.testing.assert_close(peft(ids).logits, ours(ids).logits)


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir, alpaca_file, tmp_path):
    common = dict(max_steps=2, lora_dropout=0.0, batch_size=4)
    run_training(load_config(None, overrides(tiny_model_dir, alpaca_file, tmp_path / "a", micro_batch_size=1, **common)), progress_bar=False)
    run_training(load_config(None, overrides(tiny_model_dir, alpaca_file, tmp_path / "b", micro_batch_size=4, **common)), progress_bar=False)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys()
    for k in la:
        assert abs(la[k] - lb[k]) < 1e-5
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from chinese_vicuna.config import load_config
    from chinese_vicuna.train.sft import run_training

    def kill_after_step_4(trainer, step, metrics):
        if step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

    run_training(load_config(None, sys.argv[1:]), callbacks=[kill_after_step_4], progress_bar=False)
    """
)


def test_sigkill_then_resume_matches_uninterrupted(tiny_model_dir, alpaca_file, tmp_path):
    common = dict(max_steps=7, save_steps=3, val_size=4, eval_steps=2)
    ref = tmp_path / "ref"
    run_training(load_config(None, overrides(tiny_model_dir, alpaca_file, ref, **common)), progress_bar=False)

    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, *overrides(tiny_model_dir, alpaca_file, out, **common)],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert not (out / "adapter_model.safetensors").exists()
    # a save that was killed half-way leaves only a .tmp folder, which is ignored and cleaned
    (out / "checkpoint-6.tmp").mkdir()
    assert find_resume(str(out), "auto").name == "checkpoint-3"

    run_training(load_config(None, overrides(tiny_model_dir, alpaca_file, out, resume="auto", **common)), progress_bar=False)
    assert not (out / "checkpoint-6.tmp").exists()
    lr, lk = losses(ref), losses(out)
    assert sorted(lk) == sorted(lr) == list(range(1, 8))
    for step in lr:
        assert abs(lr[step] - lk[step]) < 1e-5, (step, lr[step], lk[step])
    a, b = adapter(ref), adapter(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_init_adapter_and_new_data(tiny_model_dir, alpaca_file, tmp_path):
    first = tmp_path / "general"
    run_training(load_config(None, overrides(tiny_model_dir, alpaca_file, first, max_steps=4, save_steps=4)), progress_bar=False)
    # --init-adapter: weights from the adapter, fresh optimizer and schedule
    cont = tmp_path / "domain"
    cfg = load_config(None, overrides(tiny_model_dir, alpaca_file, cont, max_steps=1, init_adapter=first, learning_rate=0.0))
    t = run_training(cfg, progress_bar=False)
    assert t.progress.step == 1
    a, b = adapter(first), adapter(cont)
    for k in a:
        torch.testing.assert_close(a[k], b[k])  # lr 0: unchanged, so it really started from `first`
    # --resume --new-data: keeps optimizer/schedule (step counter continues), data from its start
    cfg = load_config(None, overrides(tiny_model_dir, alpaca_file, first, resume=first / "checkpoint-4", new_data="true", max_steps=2))
    t = run_training(cfg, progress_bar=False)
    assert t.progress.step == 6 and t.progress.data_offset == 4 and t.total_steps == 6
    assert t.scheduler.last_epoch == 6  # the schedule continued from step 4
    first = t._epoch_plan(0)[: t.micro_per_step]  # step 4 trained the first batches of the data
    want = [t._collate([t.data.train[i] for i in mb])["input_ids"].tolist() for mb in first]
    assert [b["input_ids"].tolist() for b in t.step_batches(4)] == want


def test_packing_trains(tiny_model_dir, alpaca_file, tmp_path):
    cfg = load_config(None, overrides(tiny_model_dir, alpaca_file, tmp_path / "p", max_steps=3, packing="true"))
    t = run_training(cfg, progress_bar=False)
    assert t.step_batches(0)[0]["input_ids"].shape[0] == 1  # one packed row per micro-batch
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in t.history if "loss" in r)


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_qlora_on_cpu(tiny_model_dir, alpaca_file, tmp_path, quant):
    pytest.importorskip("bitsandbytes")
    cfg = load_config(None, overrides(tiny_model_dir, alpaca_file, tmp_path / quant, max_steps=12, quantization=quant))
    t = run_training(cfg, progress_bar=False)
    base = t.accelerator.unwrap_model(t.wrapper).model.get_base_model()
    assert getattr(base, f"is_loaded_in_{quant}")
    ls = losses(tmp_path / quant)
    assert ls[12] < ls[1]


def test_full_finetune(tiny_model_dir, alpaca_file, tmp_path):
    cfg = load_config(None, overrides(tiny_model_dir, alpaca_file, tmp_path / "full", max_steps=3, finetuning="full", learning_rate=1e-3))
    run_training(cfg, progress_bar=False)
    assert (tmp_path / "full" / "model.safetensors").exists()
    assert (tmp_path / "full" / "config.json").exists()


def test_ddp_two_processes_match_one(tiny_model_dir, alpaca_file, tmp_path):
    """Real DDP on CPU (gloo) through torchrun: same global batch -> same adapter."""
    common = dict(max_steps=3, lora_dropout=0.0, micro_batch_size=1, batch_size=4)
    run_training(load_config(None, overrides(tiny_model_dir, alpaca_file, tmp_path / "one", **common)), progress_bar=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "chinese_vicuna", "train", *overrides(tiny_model_dir, alpaca_file, tmp_path / "two", **common)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    for k in l1:
        assert abs(l1[k] - l2[k]) < 1e-5
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_training_precision_rules(monkeypatch):
    import chinese_vicuna.model.load as load

    monkeypatch.setattr(load.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(load, "cpu_has_native_bf16", lambda: True)
    assert load.training_precision("auto", trains_base_weights=False) == ("bf16", "bfloat16")
    assert load.training_precision("auto", trains_base_weights=True) == ("bf16", "float32")
    monkeypatch.setattr(load, "cpu_has_native_bf16", lambda: False)
    assert load.training_precision("auto", trains_base_weights=False) == ("no", "float32")
    assert load.training_precision("float32", trains_base_weights=False) == ("no", "float32")
    assert load.training_precision("float16", trains_base_weights=False) == ("fp16", "float16")


def test_bf16_autocast_training_keeps_adapter_fp32(tiny_model_dir, alpaca_file, tmp_path):
    cfg = load_config(None, overrides(tiny_model_dir, alpaca_file, tmp_path / "bf16", max_steps=20, dtype="bfloat16",
                                      lora_target_modules="all-linear", lora_r=8, learning_rate=1e-2))
    t = run_training(cfg, progress_bar=False)
    model = t.accelerator.unwrap_model(t.wrapper).model
    assert t.mixed_precision == "bf16"
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    ls = losses(tmp_path / "bf16")
    assert ls[20] < ls[1]
    assert adapter(tmp_path / "bf16")[next(iter(adapter(tmp_path / "bf16")))].dtype == torch.float32


def test_checkpoint_keep_limit_keeps_best_and_tensorboard(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    out = tmp_path / "keep"
    # keep the 2 newest checkpoints, plus the best one by validation loss wherever it is
    cfg = load_config(None, overrides(tiny_model_dir, alpaca_file, out, max_steps=8, save_steps=2, eval_steps=2,
                                      val_size=4, save_total_limit=2, report_to="tensorboard"))
    t = run_training(cfg, progress_bar=False)
    names = [p.name for p in list_checkpoints(out)]
    best = f"checkpoint-{t.progress.best_step}"
    assert names[-2:] == ["checkpoint-6", "checkpoint-8"]
    assert best in names and len(names) == (2 if best in ("checkpoint-6", "checkpoint-8") else 3)
    assert list((out / "runs").glob("events.out.tfevents.*"))
