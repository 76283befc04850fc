import pytest

from chinese_vicuna.config import ConfigError, load_config


def test_yaml_and_flags_share_names_and_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora_r: 16\ndata_path: [a.jsonl, b.jsonl*0.5]\nval_size: 0.1\npacking: true\n")
    cfg = load_config(p, ["--lora-r", "4", "--lora_target_modules", "q_proj,v_proj", "--data_path", "c.jsonl",
                          "--data_path", "d.jsonl", "--group_by_length", "false", "--resume", "auto"])
    assert cfg.lora.lora_r == 4  # flags win over YAML
    assert cfg.lora.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.data.data_path == ["c.jsonl", "d.jsonl"]
    assert cfg.data.val_size == 0.1 and cfg.data.packing is True and cfg.data.group_by_length is False
    assert cfg.train.resume == "auto"
    assert load_config(p).data.data_path == ["a.jsonl", "b.jsonl*0.5"]


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--lora_r", "4", "--data_path", "x.jsonl", "--system_prompt", "你是助手"])
    cfg.save(tmp_path / "run_config.yaml")
    again = load_config(tmp_path / "run_config.yaml")
    assert again.flat() == cfg.flat()


@pytest.mark.parametrize("flags, message", [
    (["--lora_r", "eight"], "lora_r: expected int, got 'eight'"),
    (["--packing", "maybe"], "packing: expected true or false, got 'maybe'"),
    (["--template"], "--template: a value is expected"),
    (["positional"], "unexpected argument 'positional'"),
    (["--new_data", "true"], "new_data needs resume"),
    (["--finetuning", "full", "--quantization", "4bit"], "finetuning: full cannot train quantized weights"),
])
def test_bad_flags(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, flags)
