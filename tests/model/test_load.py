import os
import subprocess
import sys

from chinese_vicuna.model.adapters import target_modules
from chinese_vicuna.model.load import fix_special_tokens, load_tokenizer


def test_pad_is_never_eos_and_configs_agree(tiny_model_dir, tiny_model):
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    tok.pad_token = tok.eos_token  # the classic mistake
    tiny_model.config.eos_token_id = 99
    tiny_model.generation_config.eos_token_id = 99
    fixes = fix_special_tokens(tiny_model, tok)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert tiny_model.config.eos_token_id == tok.eos_token_id == tiny_model.generation_config.eos_token_id
    assert "config.eos_token_id: 99 -> 2" in fixes and "generation_config.eos_token_id: 99 -> 2" in fixes


def test_offline_hub_id_is_a_clear_error():
    # huggingface_hub reads HF_HUB_OFFLINE at import, so this runs in a fresh process
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "chinese_vicuna", "generate", "--model", "nobody/no-such-model",
                           "--prompt", "你好"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "error: nobody/no-such-model: not a local folder, and it could not be fetched" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_default_targets_per_architecture(tiny_model):
    assert target_modules(tiny_model, None) == ["q_proj", "v_proj"]
    assert target_modules(tiny_model, ["all-linear"]) == "all-linear"
    assert target_modules(tiny_model, ["q_proj", "k_proj"]) == ["q_proj", "k_proj"]
    tiny_model.config.model_type = "unknown-arch"
    assert target_modules(tiny_model, None) == "all-linear"
