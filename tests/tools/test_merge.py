"""`merge`: stacked adapters on all seven projections + modules_to_save, in memory and streamed.

The reference is peft itself with both adapters active at once and nothing merged, so the merged
weights are checked against the un-merged forward pass, not against another merge.
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import PROJ, make_tiny_llama, random_lora
from helpers import run_cli as cli

from chinese_vicuna.config import ConfigError
from chinese_vicuna.tools.merge import merge_adapters, parse_size, read_adapter, weight_files

ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[1, 17, 305, 4021, 9, 77, 31000, 12, 5, 6]])


def make_adapter(base_dir: Path, out: Path, seed: int, r: int, modules_to_save=None, **kw) -> Path:
    """A peft LoRA adapter with random (non-zero) lora_B and, if asked, a changed modules_to_save copy."""
    from transformers import AutoModelForCausalLM

    model = random_lora(AutoModelForCausalLM.from_pretrained(base_dir), PROJ, seed=seed, r=r,
                        modules_to_save=modules_to_save, **kw)  # fmt: skip
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model saved in several safetensors shards, so the streaming merge crosses shards."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("sharded-base")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(d, max_shard_size="2MB")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            (d / f.name).write_bytes(f.read_bytes())
    assert len(weight_files(d)) >= 3
    return d


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, sharded_base) -> tuple[Path, Path]:
    """Adapter 1 (r=4, all projections + lm_head copy) and adapter 2 (r=2, rsLoRA, alpha pattern)."""
    root = tmp_path_factory.mktemp("adapters")
    a1 = make_adapter(sharded_base, root / "plus", seed=1, r=4, modules_to_save=["lm_head"])
    a2 = make_adapter(sharded_base, root / "alpaca", seed=2, r=2, use_rslora=True, alpha_pattern={"down_proj": 16})
    (a2 / "chinese_vicuna.json").write_text(json.dumps({"template": "vicuna-chat", "base_model": "x"}), encoding="utf-8")
    return a1, a2


# Merged vs unmerged logits, from the same fp32 weights. Computed in float64 the difference is the
# merge's own error: the rounding of W + scale * B @ A to fp32 (measured up to 1.0e-5 over adapters
# drawn with 25 seeds, logits up to about 10). An fp32 forward pass adds its own rounding: the
# unmerged fp32 logits alone are up to 4.3e-5 from float64, merged vs unmerged in fp32 up to 3.3e-5.
# A merge mistake (a missed module, a wrong scale) moves logits by orders of magnitude more.
MERGE_ATOL = 2e-5  # float64 forward
FP32_ATOL = 5e-5  # fp32 forward


def reference_logits(base_dir: Path, adapter_dirs: list[Path], dtype=torch.float32) -> torch.Tensor:
    """Base + adapters through peft with every adapter active and nothing merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(adapter_dirs))])
    with torch.no_grad():
        return model.to(dtype)(IDS).logits


def merged_logits(folder: Path, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).to(dtype)(IDS).logits


def assert_merged_equals_unmerged(folder: Path, base_dir: Path, adapter_dirs: list[Path]) -> None:
    for dtype, atol in ((torch.float64, MERGE_ATOL), (torch.float32, FP32_ATOL)):
        got, ref = merged_logits(folder, dtype), reference_logits(base_dir, adapter_dirs, dtype)
        assert got.dtype == dtype and torch.allclose(got, ref, atol=atol, rtol=0), (dtype, (got - ref).abs().max())


@pytest.mark.parametrize("low_memory", [False, True], ids=["peft", "low-memory"])
def test_two_stacked_adapters_match_unmerged_peft(tmp_path, sharded_base, adapters, low_memory):
    out = merge_adapters(str(sharded_base), [str(a) for a in adapters], tmp_path / "merged", low_memory=low_memory, max_shard_size="1MB")
    ref = reference_logits(sharded_base, list(adapters))
    base = merged_logits(sharded_base)
    assert (ref - base).abs().max() > 1.0  # the adapters really change the model
    assert_merged_equals_unmerged(out, sharded_base, list(adapters))
    # sharded output + index, tokenizer with its chat template, generation config, template meta
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "chinese_vicuna.json").read_text())
    assert meta["template"] == "vicuna-chat" and "base_model" not in meta
    assert meta["merged_from"]["adapters"] == [str(a) for a in adapters]
    assert not (tmp_path / "merged.tmp").exists()


def test_every_target_module_is_merged(tmp_path, sharded_base, adapters):
    """All 7 projections of both layers move (the seed merged q/v only), lm_head is the saved copy."""
    from safetensors.torch import load_file

    out = merge_adapters(str(sharded_base), [str(adapters[0])], tmp_path / "m", low_memory=True)
    merged = load_file(str(out / "model.safetensors"))
    base = {}
    for f in weight_files(sharded_base):
        base.update(load_file(str(f)))
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    expected = {f"model.layers.{i}.{blk}.{p}.weight" for i in range(2) for p in PROJ
                for blk in (["self_attn"] if p in PROJ[:4] else ["mlp"])}
    assert changed == expected | {"lm_head.weight"}
    saved = read_adapter(str(adapters[0]))
    assert torch.equal(merged["lm_head.weight"], saved.replace["lm_head.weight"])
    d = saved.deltas["model.layers.1.mlp.down_proj.weight"]
    assert d.scale == 2.0 and d.a.shape == (4, 64)


def test_single_adapter_from_conftest_both_modes_agree(tmp_path, tiny_model_dir, tiny_adapter_dir):
    a = merge_adapters(str(tiny_model_dir), [str(tiny_adapter_dir)], tmp_path / "a")
    b = merge_adapters(None, [str(tiny_adapter_dir)], tmp_path / "b", low_memory=True)  # base from the meta file
    assert_merged_equals_unmerged(a, tiny_model_dir, [tiny_adapter_dir])
    assert_merged_equals_unmerged(b, tiny_model_dir, [tiny_adapter_dir])


def test_errors(tmp_path, tiny_model_dir, tiny_adapter_dir):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        merge_adapters(str(tiny_model_dir), [str(tmp_path)], tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        merge_adapters(str(tiny_model_dir), [str(tiny_adapter_dir)], tmp_path / "full")
    # an adapter for another architecture: its weights are not in this base
    other = make_tiny_llama(300, hidden_size=64)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="no tokenizer in the adapters nor in the base"):
        merge_adapters(str(tmp_path / "other"), [str(tiny_adapter_dir)], tmp_path / "y")
    (tmp_path / "other" / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    (tmp_path / "other" / "tokenizer_config.json").write_bytes((tiny_model_dir / "tokenizer_config.json").read_bytes())
    with pytest.raises(ConfigError, match="not in the base model|not found in the base model|update is"):
        merge_adapters(str(tmp_path / "other"), [str(tiny_adapter_dir)], tmp_path / "y", low_memory=True)
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1MiB") == 2**20
    with pytest.raises(ConfigError, match="expected a size"):
        parse_size("lots")


def test_cli_merge_and_errors(tmp_path, tiny_model_dir, tiny_adapter_dir):
    assert "--low-memory" in cli("merge", "--help").stdout
    p = cli("merge", "--model", tiny_model_dir, "--adapter", tiny_adapter_dir, "--out", tmp_path / "m", "--low-memory")
    assert f"merged 1 adapter(s) into {tmp_path / 'm'}" in p.stdout
    assert (tmp_path / "m" / "model.safetensors").exists()
    bad = cli("merge", "--model", tiny_model_dir, "--adapter", tmp_path / "nope", "--out", tmp_path / "n", check=False)
    assert bad.returncode == 2
    assert f"error: {tmp_path / 'nope'}: not an adapter folder (no adapter_config.json)" in bad.stderr


def test_dora_merges_in_both_modes(tmp_path, sharded_base, adapters):
    """DoRA: each merged row has the trained magnitude as its norm; stacked on a plain adapter, both modes agree."""
    from safetensors.torch import load_file

    dora = make_adapter(sharded_base, tmp_path / "dora", seed=5, r=4, use_dora=True)
    saved = read_adapter(str(dora))
    d = saved.deltas["model.layers.1.mlp.down_proj.weight"]
    assert d.magnitude is not None and d.magnitude.shape == (32,)
    out = merge_adapters(str(sharded_base), [str(dora)], tmp_path / "low", low_memory=True)
    assert_merged_equals_unmerged(out, sharded_base, [dora])
    merged = load_file(str(out / "model.safetensors"))
    for name, delta in saved.deltas.items():
        torch.testing.assert_close(merged[name].norm(dim=1), delta.magnitude, rtol=1e-6, atol=0)
    base = merged_logits(sharded_base)
    assert (merged_logits(out) - base).abs().max() > 1.0  # the adapter really changes the model
    # on top of adapter 1 (the norms are those of base + adapter 1, what adapter 2 was trained on)
    both = [str(adapters[0]), str(dora)]
    peft = merge_adapters(str(sharded_base), both, tmp_path / "peft2")
    low = merge_adapters(str(sharded_base), both, tmp_path / "low2", low_memory=True)
    a, b = load_file(str(peft / "model.safetensors")), load_file(str(low / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
