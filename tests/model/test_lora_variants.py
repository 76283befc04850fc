"""LoRA variants (DoRA, rsLoRA, Gaussian/PiSSA/OLoRA init, LoRA+) through the real trainer.

Each variant trains a few steps on the tiny model, then:
* the saved adapter, loaded by plain peft on the ORIGINAL base, gives the trained model's logits
  (PiSSA/OLoRA change the base in memory; their adapter is saved as the equivalent plain LoRA);
* merged (peft in memory, and streamed ``--low-memory``) logits equal the unmerged peft model's;
* the GGUF export (f32) gives llama.cpp logits equal to the merged model's;
* a run resumed from its step-2 checkpoint ends with the uninterrupted run's losses and adapter.
"""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import run_flags, write_jsonl
from safetensors.torch import load_file

from chinese_vicuna.config import ConfigError, load_config
from chinese_vicuna.train.trainer import run_training

IDS = [1, 17, 305, 4021, 9, 77, 31000, 12, 5, 6]
FP32 = dict(rtol=0, atol=1e-5)
# Merged vs unmerged logits (up to ~9 here), from the same fp32 weights. With a float64 forward the
# difference is the merge's own error, the rounding of W + delta to fp32: measured 1.9e-6 (LoRA+) to
# 9.2e-6 (PiSSA by randomized SVD), so 1e-5 holds. An fp32 forward adds its own rounding (measured
# up to 2.1e-5, rsLoRA); llama.cpp's f32 kernels with an f32 KV cache differ from peft's fp32 forward
# by up to 1.3e-5 (its default f16 KV cache: up to 4.6e-2).
MERGE_ATOL = 1e-5  # float64 forward
FP32_ATOL = 5e-5  # fp32 forward, ours or llama.cpp's
VARIANTS = {
    "dora": dict(use_dora="true"),
    "rslora": dict(use_rslora="true", lora_alpha=4),
    "gaussian": dict(lora_init="gaussian"),
    "pissa": dict(lora_init="pissa"),
    "pissa_niter": dict(lora_init="pissa", pissa_niter=2),
    "olora": dict(lora_init="olora"),
    "loraplus": dict(loraplus_lr_ratio=16),
}
MUTATING = ("pissa", "pissa_niter", "olora")


def overrides(base, data, out, **kw) -> list[str]:
    extra = dict(learning_rate=1e-2, lora_dropout=0.0, save_steps=2, lora_target_modules="all-linear", max_steps=4)
    return run_flags(base, data, out, **{**extra, **kw})


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rows = [{"instruction": f"问题{i}：{'天空为什么是蓝色的' if i % 2 else '一加一等于几'}？", "input": "",
             "output": f"【答】第{i}个回答。希望对你有帮助！"} for i in range(24)]  # fmt: skip
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.tensor([IDS])).logits[0]


def base_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def peft_logits(base_dir, adapter_dir, dtype=torch.float32) -> torch.Tensor:
    """Plain peft: the adapter on the original base, unmerged."""
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(base_model(base_dir), adapter_dir).to(dtype))


def llama_cpp_logits(path: Path) -> torch.Tensor:
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, n_threads=1, n_threads_batch=1, logits_all=True,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)  # fmt: skip
    try:
        llm.eval(IDS)
        return torch.tensor(llm.scores[: len(IDS)], dtype=torch.float32)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, data_file, tmp_path_factory) -> dict:
    """Every variant trained 4 steps (checkpoints at 2 and 4), its trainer kept."""
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name, kw in VARIANTS.items():
        cfg = load_config(None, overrides(tiny_model_dir, data_file, root / name, **kw))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out[name] = run_training(cfg, progress_bar=False)
        WARNINGS[name] = [str(w.message) for w in caught]
    return out


WARNINGS: dict[str, list[str]] = {}


def trained(trainer):
    return trainer.accelerator.unwrap_model(trainer.wrapper).model


def trained_logits64(trainer) -> torch.Tensor:
    """The trained model's logits from a float64 forward (its fp32 weights, exactly widened and restored)."""
    model = trained(trainer)
    try:
        return logits(model.double())
    finally:
        model.float()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_saved_adapter_on_the_original_base_equals_the_trained_model(runs, tiny_model_dir, name):
    t = runs[name]
    out = Path(t.cfg.train.output_dir)
    ours = logits(trained(t))
    assert (ours - logits(base_model(tiny_model_dir))).abs().max() > 0.05  # it trained
    cfg = json.loads((out / "adapter_config.json").read_text())
    if name in MUTATING:
        # converted to plain LoRA: rank 2r, [A ; A0] and [B | -B0], nothing that would touch the base again
        assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)
        # peft's advice to convert the adapter, given while it converts it, is not shown
        assert not [m for m in WARNINGS[name] if "changes the base weights" in m]
        saved = load_file(str(out / "adapter_model.safetensors"))
        a = saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        q_lora = trained(t).base_model.model.model.layers[0].self_attn.q_proj
        assert a.shape == (8, 32) and torch.equal(a[:4], q_lora.lora_A["default"].weight.detach())
        # the base the trainer holds really is the residual W - s B0 A0, not the original
        q = q_lora.base_layer.weight
        assert (q - base_model(tiny_model_dir).model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-2
        # The trained model holds W_res = W - s B0 A0 rounded to fp32 once, at initialisation; the converted
        # adapter rebuilds the same function from W. That rounding alone moves these logits (up to ~9) by
        # 4.4e-6 (pissa) / 4.2e-6 (olora), measured in float64; an fp32 forward adds its own (1.2e-5 in all).
        ref64 = peft_logits(tiny_model_dir, out, torch.float64)
        torch.testing.assert_close(trained_logits64(t), ref64, rtol=0, atol=MERGE_ATOL)
        torch.testing.assert_close(peft_logits(tiny_model_dir, out), ours, rtol=0, atol=FP32_ATOL)
    else:
        assert cfg["r"] == 4 and cfg["use_dora"] == (name == "dora") and cfg["use_rslora"] == (name == "rslora")
        torch.testing.assert_close(peft_logits(tiny_model_dir, out), ours, **FP32)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_merge_both_modes_and_gguf_equal_the_unmerged_adapter(runs, tiny_model_dir, tmp_path, name):
    from chinese_vicuna.tools.gguf import export_gguf
    from chinese_vicuna.tools.merge import merge_adapters

    adapter = Path(runs[name].cfg.train.output_dir)
    ref = peft_logits(tiny_model_dir, adapter)
    ref64 = peft_logits(tiny_model_dir, adapter, torch.float64)
    assert (ref - logits(base_model(tiny_model_dir))).abs().max() > 0.05
    for low_memory in (False, True):
        merged = base_model(merge_adapters(str(tiny_model_dir), [str(adapter)], tmp_path / f"m{low_memory}",
                                           low_memory=low_memory))  # fmt: skip
        assert {p.dtype for p in merged.parameters()} == {torch.float32}
        torch.testing.assert_close(logits(merged.double()), ref64, rtol=0, atol=MERGE_ATOL,
                                   msg=lambda m, lm=low_memory: f"{name} low_memory={lm}, float64: {m}")  # fmt: skip
        torch.testing.assert_close(logits(merged.float()), ref, rtol=0, atol=FP32_ATOL,
                                   msg=lambda m, lm=low_memory: f"{name} low_memory={lm}, fp32: {m}")  # fmt: skip
    gguf = export_gguf(str(tiny_model_dir), tmp_path / "m.gguf", adapters=[str(adapter)], gguf_type="f32")
    torch.testing.assert_close(llama_cpp_logits(gguf), ref, rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_resumed_equals_uninterrupted(runs, tiny_model_dir, data_file, tmp_path, name):
    ref = runs[name]
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(Path(ref.cfg.train.output_dir) / "checkpoint-2", out / "checkpoint-2")
    cfg = load_config(None, overrides(tiny_model_dir, data_file, out, resume=out / "checkpoint-2", **VARIANTS[name]))
    t = run_training(cfg, progress_bar=False)
    assert t.resumed_from == out / "checkpoint-2"
    want = {r["step"]: r["loss"] for r in ref.history if "loss" in r}
    got = {r["step"]: r["loss"] for r in t.history if "loss" in r}
    assert sorted(got) == [3, 4]
    for step in got:
        assert abs(got[step] - want[step]) < 1e-6, (step, got[step], want[step])
    a = load_file(str(Path(ref.cfg.train.output_dir) / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def test_loraplus_gives_b_matrices_ratio_times_the_learning_rate(runs):
    t = runs["loraplus"]
    model = trained(t)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {names[id(p)]: g["initial_lr"] for g in t.optimizer.param_groups for p in g["params"]}
    assert len(lrs) == sum(p.requires_grad for p in model.parameters())
    assert {lr for n, lr in lrs.items() if "lora_A" in n} == {1e-2}
    assert {lr for n, lr in lrs.items() if "lora_B" in n} == {0.16}
    plain = runs["gaussian"].optimizer.param_groups
    assert len(plain) == 1 and plain[0]["initial_lr"] == 1e-2


def test_dora_trains_a_magnitude_per_output_row(runs):
    saved = load_file(str(Path(runs["dora"].cfg.train.output_dir) / "adapter_model.safetensors"))
    mags = {k: v for k, v in saved.items() if k.endswith("lora_magnitude_vector")}
    assert len(mags) == 14 and mags["base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector"].shape == (32,)


def test_rslora_scale_is_alpha_over_sqrt_r(runs):
    layer = trained(runs["rslora"]).base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 4 / 2  # alpha 4 / sqrt(4), not alpha / r = 1


def test_pissa_checkpoint_merges_in_memory_and_refuses_streaming(runs, tiny_model_dir, tmp_path):
    """A PiSSA checkpoint is in training form: peft rebuilds its residual base by the same SVD."""
    from chinese_vicuna.model.load import ModelLoadError
    from chinese_vicuna.tools.merge import merge_adapters

    ckpt = Path(runs["pissa"].cfg.train.output_dir) / "checkpoint-4"
    assert json.loads((ckpt / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    merged = base_model(merge_adapters(str(tiny_model_dir), [str(ckpt)], tmp_path / "m"))
    # the same SVD again: the merged checkpoint is the trained model (up to the merge's fp32 rounding)
    torch.testing.assert_close(logits(merged.double()), trained_logits64(runs["pissa"]), rtol=0, atol=MERGE_ATOL)
    with pytest.raises(ConfigError, match="training form.*final adapter"):
        merge_adapters(str(tiny_model_dir), [str(ckpt)], tmp_path / "s", low_memory=True)
    # a LoftQ adapter fits the dequantized 4-bit base peft rebuilds on load: never streamed onto the original
    loftq = tmp_path / "loftq"
    shutil.copytree(Path(runs["gaussian"].cfg.train.output_dir) / "checkpoint-4", loftq)
    cfg = json.loads((loftq / "adapter_config.json").read_text())
    (loftq / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "loftq"}))
    with pytest.raises(ConfigError, match="loftq adapter in training form"):
        merge_adapters(str(tiny_model_dir), [str(loftq)], tmp_path / "q", low_memory=True)
    niter = Path(runs["pissa_niter"].cfg.train.output_dir) / "checkpoint-4"
    with pytest.raises(ModelLoadError, match="randomized SVD"):
        merge_adapters(str(tiny_model_dir), [str(niter)], tmp_path / "n")


@pytest.mark.parametrize("kw,message", [
    (dict(lora_init="pissa", quantization="4bit"), "lora_init: pissa initialises from the full-precision base"),
    (dict(lora_init="olora", use_dora="true"), "use_dora: cannot be combined with lora_init: olora"),
    (dict(lora_init="default", pissa_niter=4), "pissa_niter: only used with lora_init: pissa"),
    (dict(loraplus_lr_ratio=0.5), "loraplus_lr_ratio: expected >= 1"),
    (dict(loraplus_lr_ratio=16, finetuning="full"), "loraplus_lr_ratio: needs finetuning: lora"),
    (dict(lora_init="kaiming"), "lora_init"),
])  # fmt: skip
def test_bad_combinations_are_clear_errors(tiny_model_dir, data_file, tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        run_training(load_config(None, overrides(tiny_model_dir, data_file, tmp_path / "x", **kw)), progress_bar=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only message")
def test_loftq_without_cuda_says_why(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(ConfigError, match="lora_init: loftq needs a CUDA GPU"):
        run_training(load_config(None, overrides(tiny_model_dir, data_file, tmp_path / "x", lora_init="loftq")),
                     progress_bar=False)  # fmt: skip
