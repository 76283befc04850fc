"""The trainer end to end on a tiny model: learning, outputs, exact resume, accumulation, continue."""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import free_port, run_flags, write_jsonl
from safetensors.torch import load_file

from chinese_vicuna.config import load_config
from chinese_vicuna.train.checkpoint import find_resume, list_checkpoints
from chinese_vicuna.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[2]


def overrides(base, data, out, **kw):
    return run_flags(base, data, out, **kw)


def losses(out_dir):
    with open(Path(out_dir) / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["loss"]}


def adapter(out_dir):
    return load_file(str(Path(out_dir) / "adapter_model.safetensors"))


@pytest.fixture
def varied_file(tmp_path):
    """Samples from 69 to 205 tokens (trained tokens 22 to 158): padding and per-token weighting matter."""
    rows = [
        {"instruction": f"问题{i}：{'天空为什么是蓝色的' if i % 2 else '一加一等于几'}？", "input": "",
         "output": "【答】" + "这是因为阳光被散射。" * ((i * 7) % 9) + "希望对你有帮助！"}
        for i in range(40)
    ]
    return write_jsonl(tmp_path / "varied.jsonl", rows)


VARIED = dict(cutoff_len=256)


def assert_lengths_vary(trainer, factor=2.9):
    lengths = trainer.lengths
    assert max(lengths) >= factor * min(lengths) and max(lengths) < trainer.cfg.data.cutoff_len, (min(lengths), max(lengths))


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


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir, varied_file, tmp_path):
    common = dict(max_steps=2, lora_dropout=0.0, batch_size=4, **VARIED)
    ta = run_training(load_config(None, overrides(tiny_model_dir, varied_file, tmp_path / "a", micro_batch_size=1, **common)), progress_bar=False)
    tb = run_training(load_config(None, overrides(tiny_model_dir, varied_file, tmp_path / "b", micro_batch_size=4, **common)), progress_bar=False)
    assert_lengths_vary(ta)
    # the big batch really is padded: its rows have different lengths
    assert len({int(m.sum()) for m in tb.step_batches(0)[0]["attention_mask"]}) > 1
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
    from chinese_vicuna.train.trainer import run_training

    def kill_after_step_4(trainer, step, metrics):
        if step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

    run_training(load_config(None, sys.argv[1:]), callbacks=[kill_after_step_4], progress_bar=False)
    """
)


def test_sigkill_then_resume_matches_uninterrupted(tiny_model_dir, varied_file, tmp_path):
    alpaca_file = varied_file
    common = dict(max_steps=7, save_steps=3, val_size=4, eval_steps=2, **VARIED)
    ref = tmp_path / "ref"
    assert_lengths_vary(run_training(load_config(None, overrides(tiny_model_dir, alpaca_file, ref, **common)), progress_bar=False))

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


def test_packing_trains(tiny_model_dir, varied_file, tmp_path):
    cfg = load_config(None, overrides(tiny_model_dir, varied_file, tmp_path / "p", max_steps=16, packing="true",
                                      lora_dropout=0.0, lora_target_modules="all-linear", lora_r=8, learning_rate=1e-2,
                                      **VARIED))
    t = run_training(cfg, progress_bar=False)
    packed = t.step_batches(0)[0]
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed  # one packed row per micro-batch
    ls = losses(tmp_path / "p")
    assert sum(ls[k] for k in (14, 15, 16)) / 3 < sum(ls[k] for k in (1, 2, 3)) / 3 - 0.5, ls  # it learns
    # The packed row gives exactly the loss of the same samples padded side by side: position ids
    # restart per sample and no sample attends to another.
    from chinese_vicuna.data.collate import collate

    mb = t._epoch_plan(0)[0]
    assert len(mb) >= 3
    samples = [t.data.train[i] for i in mb]
    padded = collate(samples, t.tokenizer.pad_token_id)
    wrapper = t.accelerator.unwrap_model(t.wrapper).eval()
    with torch.no_grad():
        loss_packed, n_packed = wrapper(**packed)
        loss_padded, n_padded = wrapper(**padded)
        alone = sum(float(wrapper(**collate([s], t.tokenizer.pad_token_id))[0]) for s in samples)
    assert int(n_packed) == int(n_padded) > 0
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=0)
    assert abs(float(loss_packed) - alone) < 1e-5 * alone  # and each sample's loss as if it were alone


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
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    cfg = load_config(None, overrides(tiny_model_dir, alpaca_file, out, max_steps=12, finetuning="full", learning_rate=1e-3))
    t = run_training(cfg, progress_bar=False)
    ls = losses(out)
    assert sum(ls[k] for k in (10, 11, 12)) / 3 < sum(ls[k] for k in (1, 2, 3)) / 3 - 1.0, ls  # it learns
    trained = t.accelerator.unwrap_model(t.wrapper).model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    before = dict(base.named_parameters())
    after = dict(trained.named_parameters())
    assert after.keys() == before.keys()
    assert all(p.dtype == torch.float32 for p in after.values())
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert unchanged == [], unchanged  # every weight was trained, not only an adapter
    assert not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    saved = dict(reloaded.named_parameters())
    assert all(torch.equal(saved[k], after[k]) for k in after)  # the saved model is the trained one, bit for bit
    ids = torch.tensor([[5, 6, 7, 8, 300, 4000]])
    with torch.no_grad():
        # the trained model still runs the trainer's kernels (other summation order): equal to fp32 rounding
        torch.testing.assert_close(reloaded(ids).logits, trained(ids).logits, rtol=1e-5, atol=1e-5)
        assert (reloaded(ids).logits - base(ids).logits).abs().max() > 0.1


def test_bf16_modules_to_save_train_and_keep_adam_state_in_fp32(tiny_model_dir, alpaca_file, tmp_path):
    """embed_tokens/lm_head trained in full (vocabulary extension) under bf16 autocast, like the LoRA weights."""
    out = tmp_path / "mts"
    cfg = load_config(None, overrides(tiny_model_dir, alpaca_file, out, max_steps=12, dtype="bfloat16",
                                      modules_to_save="embed_tokens,lm_head", learning_rate=1e-2))
    t = run_training(cfg, progress_bar=False)
    assert t.mixed_precision == "bf16"
    model = t.accelerator.unwrap_model(t.wrapper).model
    copies = {n: p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n}
    assert {n.split(".modules_to_save")[0].rsplit(".", 1)[-1] for n in copies} == {"embed_tokens", "lm_head"}
    frozen = {n: p for n, p in model.named_parameters() if "original_module" in n}
    assert frozen and {p.dtype for p in frozen.values()} == {torch.bfloat16}  # the base stays in bf16
    state = t.optimizer.state
    for n, p in copies.items():
        assert p.dtype == torch.float32, n
        assert state[p]["exp_avg"].dtype == torch.float32 and state[p]["exp_avg_sq"].dtype == torch.float32, n
        original = frozen[n.replace("modules_to_save.default", "original_module")]
        assert (p - original.float()).abs().max() > 1e-3, n  # the copy really trained
    ls = losses(out)
    assert sum(ls[k] for k in (10, 11, 12)) / 3 < sum(ls[k] for k in (1, 2, 3)) / 3 - 0.5, ls


def test_skipped_fp16_step_does_not_advance_the_schedule(tiny_model_dir, alpaca_file, tmp_path):
    """A step the grad scaler skips (inf gradients) leaves weights, optimizer and LR schedule as they were.

    CPUs get no grad scaler from accelerate (fp16 autocast needs a GPU there), so the test gives the
    trainer's accelerated optimizer a real ``torch.amp.GradScaler`` and poisons one step's gradients.
    """
    from accelerate.optimizer import AcceleratedOptimizer

    from chinese_vicuna.train.trainer import Trainer

    cfg = load_config(None, overrides(tiny_model_dir, alpaca_file, tmp_path / "fp16", max_steps=4, max_grad_norm=0,
                                      lora_dropout=0.0, learning_rate=1e-2))
    t = Trainer(cfg, progress_bar=False).setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    t.optimizer = AcceleratedOptimizer(t.optimizer.optimizer, device_placement=False, scaler=scaler)
    t.accelerator.scaler = scaler  # accelerator.backward scales the loss
    poison = {"on": False}
    t._trainable[0].register_hook(lambda g: g * float("inf") if poison["on"] else g)
    seen = {}

    def record(trainer, step, metrics):
        seen[step] = dict(
            skipped=trainer.optimizer.step_was_skipped, epoch=trainer.scheduler.last_epoch,
            lr=trainer.scheduler.get_last_lr()[0], scale=scaler.get_scale(),
            weights=[p.detach().clone() for p in trainer._trainable],
        )
        poison["on"] = step == 1  # the gradients of step 2 overflow

    t.callbacks.append(record)
    t.train()
    assert [seen[s]["skipped"] for s in (1, 2, 3, 4)] == [False, True, False, False]
    assert [seen[s]["epoch"] for s in (1, 2, 3, 4)] == [1, 1, 2, 3]  # the skipped step did not count
    lr0 = cfg.train.learning_rate  # linear decay over 4 steps, no warmup
    assert [seen[s]["lr"] for s in (1, 2, 3)] == pytest.approx([lr0 * 3 / 4, lr0 * 3 / 4, lr0 * 2 / 4])
    assert seen[2]["scale"] == seen[1]["scale"] / 2  # the scaler backed off instead
    assert all(torch.equal(a, b) for a, b in zip(seen[1]["weights"], seen[2]["weights"]))  # nothing was applied
    assert not any(torch.equal(a, b) for a, b in zip(seen[2]["weights"], seen[3]["weights"]))  # the next step was


@pytest.mark.parametrize("kind", [pytest.param({}, id="lora"), pytest.param(
    dict(quantization="8bit", gradient_checkpointing="true"), id="8bit-reentrant-checkpointing", marks=pytest.mark.slow)])
def test_ddp_two_processes_match_one(tiny_model_dir, varied_file, tmp_path, kind):
    """Real DDP on CPU (gloo) through torchrun: same global batch -> same adapter (also with an 8-bit base,
    whose checkpointing is reentrant)."""
    alpaca_file = varied_file
    common = dict(max_steps=3, lora_dropout=0.0, micro_batch_size=1, batch_size=4, **VARIED, **kind)
    one = run_training(load_config(None, overrides(tiny_model_dir, alpaca_file, tmp_path / "one", **common)), progress_bar=False)
    assert_lengths_vary(one)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
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
