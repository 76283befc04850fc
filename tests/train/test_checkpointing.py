"""Gradient checkpointing: the same gradients as without it (LoRA, QLoRA, full), really recomputing, and resume."""

import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_flags
from safetensors.torch import load_file

from chinese_vicuna.config import ConfigError, load_config
from chinese_vicuna.train.trainer import Trainer, run_training


def flags(base, data, out, **kw):
    return run_flags(base, data, out, **{"lora_target_modules": "all-linear", **kw})


def step_gradients(cfg):
    """Gradients of the first optimizer step's loss, and how often decoder layer 0's MLP started its forward
    (transformers checkpoints the layer's ``forward``, so the hooks of its submodules see the recompute; a
    pre-hook, since torch stops the recompute as soon as the last saved tensor is rebuilt)."""
    t = Trainer(cfg, progress_bar=False).setup()
    model = t.accelerator.unwrap_model(t.wrapper).model
    layer = model.get_base_model().model.layers[0] if hasattr(model, "get_base_model") else model.model.layers[0]
    calls = []
    layer.mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    t.wrapper.train()
    torch.manual_seed(0)  # the same dropout masks in both runs
    for batch in t.step_batches(0):
        loss_sum, n = t.wrapper(**batch)
        (loss_sum / n).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return t, grads, len(calls)


@pytest.mark.parametrize(
    "kind", [dict(finetuning="lora"), dict(finetuning="full"), dict(finetuning="lora", fast_kernels="false"),
             dict(finetuning="lora", quantization="4bit"), dict(finetuning="lora", quantization="8bit")],
    ids=["lora", "full", "lora-stock-modules", "qlora", "lora-8bit"],
)
def test_checkpointing_gradients_equal_without(tiny_model_dir, alpaca_file, tmp_path, kind):
    off_t, off, off_calls = step_gradients(load_config(None, flags(
        tiny_model_dir, alpaca_file, tmp_path / "off", gradient_checkpointing="false", **kind)))
    on_t, on, on_calls = step_gradients(load_config(None, flags(
        tiny_model_dir, alpaca_file, tmp_path / "on", gradient_checkpointing="true", **kind)))
    assert not off_t.checkpointing and on_t.checkpointing
    assert on_calls == 2 * off_calls  # each layer's forward really ran again in backward
    assert sorted(on) == sorted(off) and len(on) > 0
    for name in off:
        torch.testing.assert_close(on[name], off[name], rtol=1e-5, atol=1e-7, msg=name)
    # lora_B starts at zero, so lora_A's first gradient is zero; everything else really got one
    assert all(off[n].abs().sum() > 0 for n in off if "lora_A" not in n)


def test_8bit_checkpointing_keeps_no_int8_matmul_in_the_graph(tiny_model_dir, alpaca_file, tmp_path):
    """bitsandbytes' int8 matmul holds its input on its autograd node, out of checkpointing's reach: with
    checkpointing on, an 8-bit model's graph must hold no such node (the layers are reentrant checkpoints),
    while without it there is one per quantized projection."""

    def int8_nodes(ckpt):
        t = Trainer(load_config(None, flags(tiny_model_dir, alpaca_file, tmp_path / ckpt, quantization="8bit",
                                               gradient_checkpointing=ckpt)), progress_bar=False).setup()
        t.wrapper.train()
        loss_sum, _ = t.wrapper(**t.step_batches(0)[0])
        seen, todo, names = set(), [loss_sum.grad_fn], []
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            names.append(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
        return sum("MatMul8bit" in n for n in names)

    assert int8_nodes("false") >= 2 * 5  # the quantized projections of both decoder layers
    assert int8_nodes("true") == 0


def test_checkpointing_resume_matches_uninterrupted(tiny_model_dir, alpaca_file, tmp_path):
    common = dict(max_steps=4, save_steps=2, gradient_checkpointing="true")
    ref = run_training(load_config(None, flags(tiny_model_dir, alpaca_file, tmp_path / "ref", **common)), progress_bar=False)
    assert ref.checkpointing
    # a run interrupted after step 2: its output folder holds only checkpoint-2
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "ref" / "checkpoint-2", part / "checkpoint-2")
    resumed = run_training(load_config(None, flags(tiny_model_dir, alpaca_file, part, resume="auto", **common)),
                           progress_bar=False)
    assert resumed.checkpointing and resumed.resumed_from.name == "checkpoint-2"
    a = load_file(str(Path(tmp_path / "ref") / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_checkpointing_auto_follows_the_plan(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    import chinese_vicuna.train.plan as plan

    cfg = load_config(None, flags(tiny_model_dir, alpaca_file, tmp_path / "a", max_steps=1))
    assert cfg.train.gradient_checkpointing == "auto"
    t = Trainer(cfg, progress_bar=False).setup()
    assert not t.checkpointing  # a tiny model fits this machine
    need = t.memory_plan.peak
    monkeypatch.setattr(plan, "device_memory", lambda device: need)  # a device just too small to run without it
    t2 = Trainer(load_config(None, flags(tiny_model_dir, alpaca_file, tmp_path / "b", max_steps=1)),
                    progress_bar=False).setup()
    assert t2.checkpointing and t2.memory_plan.checkpointing and t2.memory_plan.peak < need


def test_gradient_checkpointing_key_is_checked():
    with pytest.raises(ConfigError, match="gradient_checkpointing: expected auto, true or false, got 'sometimes'"):
        load_config(None, ["--gradient_checkpointing", "sometimes"])
    assert load_config(None, ["--gradient_checkpointing", "True"]).train.gradient_checkpointing == "true"
